"""Compile the trainer's or the generator's step for a TPU slice on this host (no TPU needed:
libtpu's compiler, `pip install "jax[tpu]"`), and report per-device memory against HBM, FLOPs,
collectives and a roofline bound; or sweep meshes, remat policies and micro-batches for the
ones that fit.

    python experiments/aot_compile.py --config=configs/tiny.py --topology=v5p-8 \
        --config.mesh.fsdp=2 --config.mesh.expert=2 --config.mesh.data=1
    python experiments/aot_compile.py --config=configs/tiny.py --topology=v6e-8 --step=decode
    python experiments/aot_compile.py --config=configs/tiny.py --topology=v5p-8 --sweep
    python experiments/aot_compile.py --config=configs/dbrx_132b_pretrain.py --topology=v5p --sweep

--topology takes slice names (v5p-128, v6e-16, v5e-256, v4-32, tpu7x-16) or topology strings
(v5p:4x4x4); with --sweep, a generation alone (v5p) searches its slices from the smallest for
the first that holds the step. --num_slices > 1 lays the data axis over DCN. For prefill and
decode, batch_size is the number of sequences and seq_len the prompt length (prefill) or the
cache's context (decode).
"""

import json

from absl import flags
from ml_collections import config_flags

from dbrx_jax import cli
from dbrx_jax.aot import compile as aot
from dbrx_jax.aot.programs import STEPS
from dbrx_jax.aot.topology import is_generation, parse_target

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Slice name or topology string.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN.")
_STEP = flags.DEFINE_enum("step", "train", STEPS, "Which program.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Try meshes, remat policies and micro-batches.")
_SWEEP_LIMIT = flags.DEFINE_integer(
    "sweep_limit", 12, "Compiles a sweep may make (a slice search: meshes tried per slice)."
)
_JSON = flags.DEFINE_string("output_json", None, "Also write the report(s) here.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    if len(argv) > 1:
        raise flags.Error(f"unexpected arguments: {argv[1:]}")
    config, step = _CONFIG.value, _STEP.value
    if is_generation(_TOPOLOGY.value):
        if not _SWEEP.value:
            raise flags.Error(
                f"--topology={_TOPOLOGY.value}: a generation alone is searched with --sweep; "
                "otherwise name a slice (v5p-128)"
            )
        result = aot.smallest_slice(
            config, _TOPOLOGY.value, step, _NUM_SLICES.value, meshes_per_slice=_SWEEP_LIMIT.value
        )
        print(aot.slices_summary(result))
    elif _SWEEP.value:
        target = parse_target(_TOPOLOGY.value, _NUM_SLICES.value)
        result = aot.sweep(config, target, step, limit=_SWEEP_LIMIT.value)
        print(aot.fits_summary(result))
    else:
        result = aot.compile_report(config, parse_target(_TOPOLOGY.value, _NUM_SLICES.value), step)
        print(aot.format_report(result))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    cli.run(main)
