"""Chat fine-tuning with LoRA: the `make train` model learns to quote the King James Bible by
reference ("Quote Genesis 1:3." -> the verse), from the embedded kjv_chat set (Genesis 1-10,
240 conversations; 27 references held out), with rank-16 adapters on attention and every
expert matrix and the base frozen. The loss counts the assistant's tokens only; before and after
training it scores greedy replies to the held-out references (exact match, character accuracy).

    make train                                    # the base: runs/demo
    python experiments/export.py --workdir=runs/demo --output=runs/demo-export
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python experiments/train.py --config=configs/sft_demo.py --workdir=runs/sft
    python experiments/export.py --workdir=runs/sft --output=runs/sft-merged --merge_lora

The base's tokenizer has no ChatML tokens, so the markers are written as text (chat.py). The
argument after the colon names another base run (its export `<run>-export` and its tokenizer):
`--config=configs/sft_demo.py:runs/other`.

On 2 CPU cores: about 1.2 s a step, 6 minutes; the loss on the assistant's tokens falls from 4.3
to about 1.2, and held-out character accuracy moves from 28.6% to 30.1% (exact match 0 before
and after). The 6.6M-parameter base saw the KJV text once and cannot recall a verse it is not
shown, so this demo shows the machinery (adapters, masking, scoring), not a capable quoter;
the same config on a larger base is the real experiment.
"""

from dbrx_jax.experiment import base_config, model_section


def get_config(base_run: str = "runs/demo"):
    config = base_config()
    # configs/demo.py's model, with adapters
    config.model = model_section(
        "dbrx-small",
        d_model=128,
        ffn_hidden_size=256,
        lora_rank=16,
        lora_alpha=32.0,
        lora_targets="attn.*,ffn.w1,ffn.v1,ffn.w2",
    )
    config.init_from = f"{base_run}-export"
    config.data.source = "kjv_chat"
    config.data.tokenizer = f"{base_run}/spm_512.model"
    config.data.eval_fraction = 0.05
    config.total_steps = 300
    config.batch_size = 16
    config.seq_len = 128
    config.learning_rate = 1e-2
    config.warmup_steps = 10
    config.weight_decay = 0.0
    config.log_every_steps = 10
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 1
    config.mesh.data = 4
    config.mesh.expert = 2
    config.score_references = 27
    return config
