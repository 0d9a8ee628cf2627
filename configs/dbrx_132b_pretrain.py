"""Pretraining dbrx-132b at DBRX's shape: seq 4096, AdamW with fp32 master weights and moments,
bf16 compute, full remat, on a TPU v5p-128 slice (64 chips: fsdp 4 x expert 16, each mesh axis
on whole physical axes of the 4x4x4 torus). Verified by compiling, no TPU needed:

    python experiments/aot_compile.py --config=configs/dbrx_132b_pretrain.py --topology=v5p-128

The per-chip memory as compiled is in the README's "Compiling for TPU" table. To run it for
real, point `data.source` at a tokenized corpus and launch the same command line with
experiments/train.py on every host of the slice.
"""

from dbrx_jax.experiment import base_config, model_section

TOPOLOGY = "v5p-128"  # the slice its mesh is for (tests build the mesh on its devices)


def get_config():
    config = base_config()
    config.model = model_section(
        "dbrx-132b", param_dtype="float32", dtype="bfloat16", remat_policy="full"
    )
    config.total_steps = 100_000
    config.batch_size = 64  # sequences of 4096 tokens: 262k tokens a step, one per chip
    config.seq_len = 4096
    config.learning_rate = 3e-4
    config.warmup_steps = 2000
    config.weight_decay = 0.1
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    config.log_every_steps = 10
    config.mesh.data = 1
    config.mesh.fsdp = 4
    config.mesh.expert = 16
    config.data.tokenizer = "dbrx"
    return config
