"""Conversion benchmark at the released tensor shapes (d 6144, F 10752, 16 experts, vocab
100352) with fewer layers: hf_to_jax and jax_to_hf of a synthetic checkpoint, their peak RSS,
wall time and MB/s, next to a plain copy of the same files in the same run.

    python experiments/bench_convert.py --layers=2 --workdir=/tmp/bench_convert   # ~15 GB
"""

import json

from absl import app, flags

from dbrx_jax import DbrxConfig, bench

_PRESET = flags.DEFINE_string("preset", "dbrx-132b", "Shapes to use.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers (the release has 40).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dbrx_jax_bench_convert", "Scratch directory.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = DbrxConfig.preset(_PRESET.value, n_layers=_LAYERS.value)
    report = bench.convert_benchmark(_WORKDIR.value, config)
    gib = 2**30
    report["rss_target_gib"] = (2 * report["largest_tensor_bytes"] + gib) / gib
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
