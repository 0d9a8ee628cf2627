"""Per-device memory of the --config's model and optimizer (config.optimizer: AdamW's two
moments, Lion's one) on meshes of any size, from shapes alone; with --time the measured training
step (config.batch_size x config.seq_len) on the meshes that fit the devices at hand. One JSON
line per mesh.

    python -m benchmarks.mesh_report --config.model.preset=dbrx-132b \
        --meshes=fsdp=8,expert=8 --meshes=fsdp=32,expert=8
    python -m benchmarks.mesh_report --config.model.preset=dbrx-132b --config.model.lora_rank=16 \
        --config.model.lora_targets='attn.*,ffn.*' --config.model.param_dtype=bfloat16 \
        --base_bits=4 --meshes=data=1
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.mesh_report --time \
        --meshes=data=8 --meshes=expert=8 --meshes=data=2,expert=4
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import cli, timing
from dbrx_jax import memory, sharding

OPTIMIZER_MOMENTS = {"adamw": 2, "lion": 1}

_CONFIG = config_flags.DEFINE_config_file("config", cli.BENCH_CONFIG, "Experiment config file.")
_MESHES = flags.DEFINE_multi_string("meshes", ["data=8"], "Axis sizes, e.g. fsdp=8,expert=8.")
_TIME = flags.DEFINE_bool("time", False, "Also time a training step on each mesh.")
_BASE_BITS = flags.DEFINE_enum(
    "base_bits", "none", ["none", "8", "4"], "A LoRA model's base: as stored, or int8 / 4-bit."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s", jax.devices())
    config = _CONFIG.value
    model = cli.model_config(config)
    for text in _MESHES.value:
        sizes = sharding.parse_mesh(text)
        moments = OPTIMIZER_MOMENTS[config.optimizer]
        if model.lora_rank:  # the frozen base, the adapters and what trains them
            bits = None if _BASE_BITS.value == "none" else int(_BASE_BITS.value)
            plan = memory.lora_memory_per_device(
                model, sizes, base_bits=bits, optimizer_moments=moments
            )
        else:
            plan = memory.memory_per_device(model, sizes, optimizer_moments=moments)
        row = {"mesh": sizes, **plan}
        if _TIME.value:
            mesh = sharding.make_mesh(sizes)
            row |= timing.time_train_step(model, mesh, config.batch_size, config.seq_len)
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
