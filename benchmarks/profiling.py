"""Where a compiled step's time goes: a `jax.profiler` trace of a few steps, with each op's time
attributed to the part of the model it came from.

The library marks its parts with `jax.named_scope`: `attention` (dbrx_jax/model/layers.py),
`router` (moe/layer.py), `permute` (sorting and moving token rows) and `expert_gemm`
(moe/dispatch.py), `expert_exchange` (the expert-parallel collectives, moe/exchange.py),
`lm_head` (with the loss: model/dbrx.py, train.py) and `optimizer` (train.py). XLA keeps the
scope in every instruction's metadata (`op_name`) through autodiff, remat and fusion (a fusion
carries its root's), and the trace names the instruction each event ran (`hlo_op`). Ops from
none of the scopes are GSPMD's collectives (gradient all-reduces, FSDP gathers) or `other`
(norms, residual adds, the embedding, the layer loop's bookkeeping).

Device planes (GPU, TPU) are used when the trace has them; on CPU the host threads' op events
are (these can overlap in time, so the sum may exceed the wall time).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from collections.abc import Callable

import jax

# Scope in op_name -> category, first match wins (a GEMM inside the optimizer is optimizer).
SCOPES = (
    ("optimizer", "optimizer"),
    ("expert_exchange", "expert exchange"),
    ("expert_gemm", "expert GEMMs"),
    ("permute", "routing + permutation"),
    ("router", "routing + permutation"),
    ("attention", "attention"),
    ("lm_head", "lm_head + loss"),
)
CATEGORIES = (*dict.fromkeys(c for _, c in SCOPES), "collectives", "other")
_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "ragged-all-to-all",
)
# Ops whose events enclose other ops' events (counting them would count their bodies twice).
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}

_PLUMBING = ("jit(", "while", "body", "closed_call", "cond", "branch_", "checkpoint", "remat")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (opcode, op_name) for every instruction of a compiled module's text
    (`compiled.as_text()`), nested computations included."""
    out = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        opcode = _OPCODE.search(" " + rest.split(", metadata=")[0])
        op_name = _OP_NAME.search(rest)
        if opcode:
            out[name.lstrip("%")] = (opcode.group(1), op_name.group(1) if op_name else "")
    return out


def module_name(hlo_text: str) -> str:
    match = re.search(r"^HloModule\s+([^\s,]+)", hlo_text, re.MULTILINE)
    if not match:
        raise ValueError("not an HLO module's text: no 'HloModule <name>' line")
    return match.group(1)


def category(opcode: str, op_name: str) -> str | None:
    """The category of an instruction, or None for a container (while, call, ...)."""
    base = opcode.removesuffix("-start").removesuffix("-done")
    if opcode in _CONTAINERS:
        return None
    for scope, name in SCOPES:
        if re.search(rf"(^|[/(]){scope}([/)]|$)", op_name):
            return name
    return "collectives" if base in _COLLECTIVES else "other"


def op_times_ns(trace_dir: str, module: str) -> collections.Counter:
    """Total duration (ns) of each HLO instruction of `module` over a trace written by
    `jax.profiler.trace(trace_dir)`."""
    from jax.profiler import ProfileData

    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"{trace_dir}: no *.xplane.pb trace file")
    totals: collections.Counter = collections.Counter()
    for path in paths:
        planes = list(ProfileData.from_file(path).planes)
        devices = [_plane_ops(p, module) for p in planes if p.name.startswith("/device:")]
        hosts = [_plane_ops(p, module) for p in planes if p.name.startswith("/host:CPU")]
        # Device planes that ran the module (a loaded plugin, libtpu say, adds empty ones).
        for ops in [ops for ops in devices if ops] or hosts:
            totals.update(ops)
    return totals


def _plane_ops(plane, module: str) -> collections.Counter:
    lines = list(plane.lines)
    # GPU planes list each op on "XLA Ops" and its kernels on stream lines: keep one.
    op_lines = [line for line in lines if line.name == "XLA Ops"] or lines
    ops: collections.Counter = collections.Counter()
    for line in op_lines:
        for event in line.events:
            stats = dict(event.stats)
            if stats.get("hlo_module") == module and "hlo_op" in stats:
                ops[stats["hlo_op"]] += event.duration_ns
    return ops


def breakdown(
    op_ns: collections.Counter, hlo_text: str, steps: int, top: int = 8
) -> dict[str, dict]:
    """Milliseconds per step and share of the op time, by category; and the `top` biggest ops
    of `other` (what a new scope or fusion should look at next)."""
    instructions = hlo_instructions(hlo_text)
    ms = dict.fromkeys(CATEGORIES, 0.0)
    unknown = 0.0
    other: collections.Counter = collections.Counter()
    for op, ns in op_ns.items():
        if op not in instructions:
            unknown += ns
            continue
        opcode, op_name = instructions[op]
        name = category(opcode, op_name)
        if name is not None:
            ms[name] += ns / 1e6 / steps
        if name == "other":
            other[f"{opcode} {_short(op_name)}"] += ns / 1e6 / steps
    total = sum(ms.values())
    return {
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "share": {k: round(v / total, 4) if total else 0.0 for k, v in ms.items()},
        "op_ms_per_step": round(total, 3),
        "unmatched_ms_per_step": round(unknown / 1e6 / steps, 3),
        "top_other_ms": {k: round(v, 3) for k, v in other.most_common(top)},
    }


def _short(op_name: str) -> str:
    """An op_name without the jit/while/closed_call plumbing: what the source op was."""
    parts = [p for p in op_name.split("/") if p and not p.startswith(_PLUMBING)]
    return "/".join(parts[-3:])


def profile_steps(
    run_step: Callable[[], object], hlo_text: str, steps: int = 3, trace_dir: str | None = None
) -> dict[str, dict]:
    """Traces `steps` calls of `run_step` (an already compiled step; its outputs are waited
    on) and attributes the time of `hlo_text`'s module (`compiled.as_text()`) by category.
    The trace is kept in `trace_dir` if given (open it in TensorBoard or Perfetto)."""
    directory = trace_dir or tempfile.mkdtemp(prefix="dbrx-trace-")
    with jax.profiler.trace(directory):
        for _ in range(steps):
            jax.block_until_ready(run_step())
    return breakdown(op_times_ns(directory, module_name(hlo_text)), hlo_text, steps)
