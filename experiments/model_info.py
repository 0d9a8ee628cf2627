"""Size, FLOPs and (with --time) compile and forward time of a model config or HF checkpoint.

python experiments/model_info.py --config=configs/tiny.py --time
python experiments/model_info.py --config=configs/tiny.py --config.model.n_layers=16 --time
python experiments/model_info.py --hf_dir=path/to/dbrx --time --seq_len=512
"""

import json

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

import dbrx_jax
from dbrx_jax import experiment, summary

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Load this Hugging Face DBRX directory instead.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Batch size for --time.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length for FLOPs and --time.")
_TIME = flags.DEFINE_bool("time", False, "Build the model, compile and time a forward pass.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s; processes: %d", jax.devices(), jax.process_count())
    if _HF_DIR.value:
        model = dbrx_jax.from_pretrained(_HF_DIR.value)
        config = model.config
    else:
        config = experiment.model_config(_CONFIG.value.model)
        model = None
    report = {"config": json.loads(config.to_json()), **summary.describe(config, _SEQ_LEN.value)}
    if _TIME.value:
        model = model or dbrx_jax.Dbrx(config, rngs=nnx.Rngs(_CONFIG.value.seed))
        report |= summary.time_forward(model, _BATCH_SIZE.value, _SEQ_LEN.value)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
