"""The `make train` job: a small DBRX (dbrx-small narrowed to d_model 128: 4 layers, 16 experts,
top-4, 2.3M parameters) on the KJV Bible with a 512-piece sentencepiece vocabulary, on 8
simulated CPU devices with expert parallelism (data 4 x expert 2).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python experiments/train.py --config=configs/demo.py --workdir=runs/demo

On 2 CPU cores: about 0.6 s a step, 6 minutes in all; the loss falls from ln(512) = 6.2 to
about 2.7 (held-out 2.7).
"""

from dbrx_jax.experiment import base_config, model_section


def get_config():
    config = base_config()
    config.model = model_section("dbrx-small", d_model=128, ffn_hidden_size=256)
    config.total_steps = 550
    config.batch_size = 16
    config.seq_len = 128
    config.learning_rate = 5e-3
    config.warmup_steps = 30
    config.log_every_steps = 25
    config.eval_every_steps = 275
    config.eval_batches = 8
    config.checkpoint_every_steps = 100  # `make train` again resumes (or, when done, just reports)
    config.keep_checkpoints = 2
    config.mesh.data = 4
    config.mesh.expert = 2
    config.data.spm_vocab_size = 512
    config.sample_prompts = "In the beginning|And Jesus said unto them|The LORD is my shepherd"
    return config
