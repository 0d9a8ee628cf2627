"""Checkpoint save (the part that blocks the training loop, and until it is on disk) and restore
times of a state of --gib GiB, with the training Checkpointer.

    python -m benchmarks.bench_checkpoint --gib=1 --directory=/tmp/bench_ckpt
"""

import json
import os
import shutil
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
from absl import app, flags

from dbrx_jax.io.checkpoint import Checkpointer

_GIB = flags.DEFINE_float("gib", 1.0, "State size in GiB.")
_DIRECTORY = flags.DEFINE_string(
    "directory",
    os.path.join(tempfile.gettempdir(), "dbrx_jax_bench_checkpoint"),
    "Where to write (removed first and after).",
)


def _data_iterator():
    return iter(grain.MapDataset.range(4).to_iter_dataset())


def checkpoint_benchmark(directory: str, gib: float = 1.0, arrays: int = 16) -> dict[str, float]:
    """Seconds to save `arrays` fp32 arrays of `gib` GiB in all asynchronously (blocking, and
    until on disk) and to restore them."""
    per_array = int(gib * 2**30 / 4 / arrays)
    key = jax.random.key(0)
    state = {
        f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (per_array,), jnp.float32)
        for i in range(arrays)
    }
    jax.block_until_ready(state)
    saver = Checkpointer(directory, async_save=True)
    start = time.perf_counter()
    saver.save(1, state, _data_iterator(), {})
    blocking = time.perf_counter() - start
    saver.wait()
    total = time.perf_counter() - start
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    start = time.perf_counter()
    jax.block_until_ready(saver.restore(1, abstract, _data_iterator()))
    restore = time.perf_counter() - start
    saver.close()
    return {"gib": gib, "save_blocking_s": blocking, "save_total_s": total, "restore_s": restore}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    shutil.rmtree(_DIRECTORY.value, ignore_errors=True)
    try:
        print(json.dumps(checkpoint_benchmark(_DIRECTORY.value, _GIB.value)))
    finally:
        shutil.rmtree(_DIRECTORY.value, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
