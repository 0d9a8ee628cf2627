"""Size and FLOPs of the --config's model (or of a Hugging Face checkpoint) at config.seq_len,
and with --time the compile and forward time at config.batch_size x config.seq_len.

    python -m benchmarks.model_info --time                               # dbrx-small
    python -m benchmarks.model_info --config=configs/tiny.py --config.model.n_layers=16 --time
    python -m benchmarks.model_info --hf_dir=path/to/dbrx --config.seq_len=512 --time
"""

import json

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

import dbrx_jax
from benchmarks import cli, timing
from dbrx_jax import flops

_CONFIG = config_flags.DEFINE_config_file("config", cli.BENCH_CONFIG, "Experiment config file.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Load this Hugging Face DBRX directory instead.")
_TIME = flags.DEFINE_bool("time", False, "Build the model, compile and time a forward pass.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s; processes: %d", jax.devices(), jax.process_count())
    config = _CONFIG.value
    if _HF_DIR.value:
        model = dbrx_jax.from_pretrained(_HF_DIR.value)
        model_config = model.config
    else:
        model, model_config = None, cli.model_config(config)
    report = {
        "config": json.loads(model_config.to_json()),
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        **flops.describe(model_config, config.seq_len),
    }
    if _TIME.value:
        model = model or dbrx_jax.Dbrx(model_config, rngs=nnx.Rngs(config.seed))
        report |= timing.time_forward(model, config.batch_size, config.seq_len)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
