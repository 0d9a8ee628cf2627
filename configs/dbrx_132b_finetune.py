"""Full fine-tuning of the released dbrx-instruct (bf16 weights and AdamW moments) at seq 4096
on a TPU v5p-128 slice (fsdp 4 x expert 16), from the released weights converted once with
experiments/convert.py. Verified by compiling, no TPU needed:

    python experiments/aot_compile.py --config=configs/dbrx_132b_finetune.py --topology=v5p-128

Then, on the slice:

    python experiments/convert.py --direction=hf_to_jax --input=dbrx-instruct \
        --output=dbrx-instruct-jax --mesh=fsdp=4,expert=16
    python experiments/train.py --config=configs/dbrx_132b_finetune.py --workdir=runs/ft \
        --config.data.source=jsonl:<your data>
"""

from dbrx_jax.experiment import base_config, model_section

TOPOLOGY = "v5p-128"  # the slice its mesh is for (tests build the mesh on its devices)


def get_config():
    config = base_config()
    config.model = model_section("dbrx-132b", remat_policy="full")  # bf16, as released
    config.init_from = "dbrx-instruct-jax"
    config.total_steps = 2000
    config.batch_size = 64
    config.seq_len = 4096
    config.learning_rate = 1e-5
    config.min_lr_ratio = 0.0
    config.warmup_steps = 50
    config.weight_decay = 0.0
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 200
    config.mesh.data = 1
    config.mesh.fsdp = 4
    config.mesh.expert = 16
    config.data.tokenizer = "dbrx"
    return config
