"""Training metrics out to the console (a progress bar), `workdir/metrics.jsonl` (one object per
log line) and TensorBoard (`workdir/tb`), from process 0 only."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

_CONSOLE = ("loss", "ce", "grad_norm", "learning_rate", "tokens_per_s", "mfu", "eval_loss")


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
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        if console:
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
