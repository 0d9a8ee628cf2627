"""Conversion benchmark: hf_to_jax and jax_to_hf (experiments/convert.py, each in its own
process) of a synthetic checkpoint of the --config's model, their peak RSS, wall time and MB/s,
next to a plain copy of the same files in the same run, then a bitwise round-trip check.

--config has no default: the released shapes with all 40 layers would write 263 GB. The release's
tensors with two layers (about 15 GB):

    python -m benchmarks.bench_convert --config=configs/bench.py:dbrx-132b \
        --config.model.n_layers=2 --workdir=/tmp/bench_convert
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import cli, synthetic
from dbrx_jax import DbrxConfig
from dbrx_jax.io.safetensors import SafetensorsCheckpoint

CONVERT = cli.ROOT / "experiments" / "convert.py"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config (the model's shapes).")
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join(tempfile.gettempdir(), "dbrx_jax_bench_convert"), "Scratch directory."
)


def _convert(direction: str, source: str, target: str, nbytes: int) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            str(CONVERT),
            f"--direction={direction}",
            f"--input={source}",
            f"--output={target}",
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{direction} failed:\n{out.stderr[-3000:]}")
    peak = float(re.search(r"peak RSS ([\d.]+) GiB", out.stdout).group(1))
    return {"s": seconds, "MB_per_s": nbytes / seconds / 1e6, "peak_rss_gib": peak}


def convert_benchmark(workdir: str, config: DbrxConfig, *, keep: bool = False) -> dict:
    """Both conversions of a synthetic checkpoint next to a plain copy, and the bitwise check."""
    hf, ours, back, copy = (os.path.join(workdir, n) for n in ("hf", "ours", "back", "copy"))
    for path in (hf, ours, back, copy):
        shutil.rmtree(path, ignore_errors=True)
    nbytes = synthetic.synthetic_hf_checkpoint(hf, config)
    expert_bytes = config.moe_num_experts * config.ffn_hidden_size * config.d_model * 2
    report = {"bytes": nbytes, "largest_tensor_bytes": expert_bytes}
    start = time.perf_counter()
    shutil.copytree(hf, copy)
    seconds = time.perf_counter() - start
    report["copy"] = {"s": seconds, "MB_per_s": nbytes / seconds / 1e6}
    shutil.rmtree(copy)
    report["hf_to_jax"] = _convert("hf_to_jax", hf, ours, nbytes)
    report["jax_to_hf"] = _convert("jax_to_hf", ours, back, nbytes)
    a, b = SafetensorsCheckpoint(hf), SafetensorsCheckpoint(back)
    report["round_trip_bitwise"] = all(
        np.array_equal(a.get(n).view(np.uint16), b.get(n).view(np.uint16)) for n in a
    )
    # What the streaming converter aims for: two of the largest tensor, plus 1 GiB.
    report["rss_target_gib"] = (2 * expert_bytes + 2**30) / 2**30
    if not keep:
        for path in (hf, ours, back):
            shutil.rmtree(path, ignore_errors=True)
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = convert_benchmark(_WORKDIR.value, cli.model_config(_CONFIG.value))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
