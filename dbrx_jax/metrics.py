"""Training metrics out to the console (a progress bar), `workdir/metrics.jsonl` (one object per
log line) and TensorBoard (`workdir/tb`), from process 0 only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, for MFU (vendor figures; sparse figures are twice these).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


# HBM bandwidth per chip (bytes/s), for the decode roofline.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "TPU v5p": 2.76e12,
    "TPU v5 lite": 8.2e11,
    "TPU v6 lite": 1.64e12,
    "TPU v4": 1.2e12,
}

_CONSOLE = ("loss", "ce", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "eval_loss")


def peak_flops(device_kind: str | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind; None where unknown (CPUs)."""
    kind = device_kind or jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def peak_bandwidth(device_kind: str | None = None) -> float | None:
    kind = device_kind or jax.devices()[0].device_kind
    for name, bandwidth in PEAK_BANDWIDTH.items():
        if name.lower() in kind.lower():
            return bandwidth
    return None


def to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
    """Writes on process 0; a no-op elsewhere."""

    def __init__(self, workdir: str, total_steps: int, *, console: bool = True):
        self.active = jax.process_index() == 0
        self._jsonl = self._tb = self._bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        if console:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, dynamic_ncols=True, unit="step")

    def write(self, step: int, metrics: Mapping[str, object], prefix: str = "") -> None:
        if not self.active:
            return
        row = {"step": step, **{prefix + k: to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for i, v in enumerate(np.ravel(value)):
                    self._tb.add_scalar(f"{key}/{i}", v, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        if self._bar is not None:
            shown = {k: row[k] for k in _CONSOLE if isinstance(row.get(k), float)}
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
