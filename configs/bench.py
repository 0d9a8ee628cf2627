"""The benchmarks' config (python -m benchmarks.<name> --config=configs/bench.py[:preset]): a
model preset at the benchmarks' default batch, on every device as data parallelism. The argument
after the colon picks the preset (default dbrx-small); any key can be overridden, e.g.

    python -m benchmarks.bench_train --config=configs/bench.py:dbrx-bench \
        --config.batch_size=4 --config.seq_len=2048 --config.model.attention_impl=cudnn
"""

from dbrx_jax.experiment import base_config, model_section


def get_config(preset: str = "dbrx-small"):
    config = base_config()
    config.model = model_section(preset)
    config.batch_size = 8
    config.seq_len = 128
    return config
