"""A tiny DBRX (dbrx-tiny: 2 layers, d_model 64, 16 experts top-4) on the KJV Bible with a
1024-piece sentencepiece vocabulary: 20 steps in well under a minute on 2 CPU cores. Tests use it.

    python experiments/train.py --config=configs/tiny.py --workdir=/tmp/tiny
"""

from dbrx_jax.experiment import base_config, model_section


def get_config():
    config = base_config()
    config.model = model_section("dbrx-tiny")
    config.total_steps = 20
    config.batch_size = 8
    config.seq_len = 64
    config.warmup_steps = 2
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.eval_batches = 2
    config.data.spm_vocab_size = 1024
    return config
