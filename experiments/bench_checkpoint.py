"""Checkpoint save (blocking part and total) and restore times for a state of a given size.

python experiments/bench_checkpoint.py --gib=1 --directory=/tmp/bench_ckpt
"""

import json
import shutil

from absl import app, flags

from dbrx_jax import bench

_GIB = flags.DEFINE_float("gib", 1.0, "State size in GiB.")
_DIRECTORY = flags.DEFINE_string(
    "directory", "/tmp/dbrx_jax_bench_checkpoint", "Where to write (removed first and after)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    shutil.rmtree(_DIRECTORY.value, ignore_errors=True)
    try:
        print(json.dumps(bench.checkpoint_benchmark(_DIRECTORY.value, _GIB.value)))
    finally:
        shutil.rmtree(_DIRECTORY.value, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
