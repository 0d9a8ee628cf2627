"""What the entry points share: where the repository and the default config are, the model of an
experiment config, how a report is written, and the transformers worker process (this module
imports no torch: the process that runs JAX never loads it)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import ml_collections

from dbrx_jax import DbrxConfig, experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
BENCH_CONFIG = str(ROOT / "configs" / "bench.py")  # the --config default, whatever the cwd


def model_config(config: ml_collections.ConfigDict) -> DbrxConfig:
    """The checked experiment config's model (its preset with the `--config.model.*` overrides)."""
    experiment.validate(config)
    return experiment.model_config(config.model)


def write_report(report: dict, json_out: str | None) -> None:
    """Prints `report` as JSON (after the log lines) and writes it to `json_out` if given."""
    print(json.dumps(report, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=2)


def run_worker(module: str, argv: Sequence[str]):
    """transformers' side of a comparison: `python -m module --hf_worker ARGV` (without
    --compare_hf / --json_out) in its own process from the repository root, with JAX on CPU
    there; returns the JSON of its last output line. Call it before this process touches the
    accelerator: XLA preallocates most of its memory on first use, which would starve PyTorch."""
    args = [a for a in argv if not a.startswith(("--compare_hf", "--json_out"))]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", module, "--hf_worker", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if out.returncode:
        raise RuntimeError(f"the transformers worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
