"""Per-device memory of a model on meshes of any size (from shapes alone), and with --time the
measured training step time on the meshes that fit the devices at hand.

    python experiments/mesh_report.py --config=configs/tiny.py --config.model.moe_impl=dropless \
        --preset=dbrx-132b --meshes="fsdp=8,expert=8" --meshes="fsdp=32,expert=8"
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/mesh_report.py \
        --time --meshes="data=8" --meshes="expert=8" --meshes="data=2,expert=4"
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dbrx_jax import DbrxConfig, experiment, sharding, summary

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_PRESET = flags.DEFINE_string("preset", None, "Report on this preset instead of --config's.")
_MESHES = flags.DEFINE_multi_string("meshes", ["data=8"], "Axis sizes, e.g. fsdp=8,expert=8.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adamw", ["adamw", "lion"], "Moments to count.")
_TIME = flags.DEFINE_bool("time", False, "Also time a training step on each mesh.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global batch size for --time.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Sequence length for --time.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s", jax.devices())
    config = (
        DbrxConfig.preset(_PRESET.value)
        if _PRESET.value
        else experiment.model_config(_CONFIG.value.model)
    )
    for text in _MESHES.value:
        sizes = sharding.parse_mesh(text)
        row = {
            "mesh": sizes,
            **summary.memory_per_device(
                config, sizes, optimizer_moments=2 if _OPTIMIZER.value == "adamw" else 1
            ),
        }
        if _TIME.value:
            mesh = sharding.make_mesh(sizes)
            row |= summary.time_train_step(config, mesh, _BATCH_SIZE.value, _SEQ_LEN.value)
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
