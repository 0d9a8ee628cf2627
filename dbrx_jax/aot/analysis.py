"""What a compiled program says about itself: memory per device by kind, FLOPs, the collectives
in the optimized HLO (kind, count, bytes, the mesh axes they run over, loops counted by their
trip counts), a roofline bound on the step time, and a one-screen answer to out-of-memory.

The roofline is a bound, not a prediction: step time >= max(FLOPs / peak, HBM bytes / HBM
bandwidth, collective bytes / ICI bandwidth), each per chip, with the chip figures of
aot/topology.py (vendor peaks; the collective term uses a ring's (n - 1) / n of the bytes and
the chip's whole ICI bandwidth, so it is optimistic where a collective runs over one axis).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh

from dbrx_jax.aot.topology import GiB, Target

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)


def _array_bytes(text: str) -> list[float]:
    return [
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(text)
    ]


# ---------------------------------------------------------------------------------------------
# The HLO: computations, loop trip counts, collectives.


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """name -> its instruction lines, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(2)
            comps[current] = []
            entry = current if match.group(1) else entry
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    return comps, entry


def _trip_count(condition: list[str]) -> int:
    """A scan's while condition compares its counter with a constant: that constant."""
    constants = [int(c) for line in condition for c in re.findall(r"constant\((\d+)\)", line)]
    return max(constants, default=1)


def _multiplicity(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry (while bodies by their trip
    counts; both branches of a conditional once, an upper bound)."""
    times: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, n: int, depth: int = 0) -> None:
        if name not in comps or depth > 50:
            return
        times[name] += n
        for line in comps[name]:
            body = re.search(r"body=%?([\w.\-]+)", line)
            if body and " while(" in line:
                condition = re.search(r"condition=%?([\w.\-]+)", line)
                trips = _trip_count(comps.get(condition.group(1), [])) if condition else 1
                visit(body.group(1), n * trips, depth + 1)
            for callee in re.findall(r"(?:calls|branch_computations)=\{?%?([\w.\-, %]+)\}?", line):
                for name_ in re.split(r",\s*%?", callee):
                    visit(name_.strip("% "), n, depth + 1)

    visit(entry, 1)
    return times


def _group_ids(text: str, devices: int) -> np.ndarray | None:
    """The replica groups of one collective as a [groups, size] array of partition ids."""
    explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", text)
    if explicit:
        groups = [
            [int(i) for i in g.split(",") if i]
            for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))
        ]
        if groups and all(len(g) == len(groups[0]) for g in groups) and groups[0]:
            return np.array(groups)
        return None
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(i) for i in iota.group(1).split(",")]
        dims = [int(i) for i in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(i) for i in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1)
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    if named:
        axes = re.findall(r"'(\w+)'=(\d+)", named.group(1))
        over = re.findall(r"'(\w+)'", named.group(2))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        if math.prod(sizes) != devices:
            return None
        ids = np.arange(devices).reshape(sizes)
        moved = [names.index(a) for a in names if a not in over] + [names.index(a) for a in over]
        group = math.prod(sizes[names.index(a)] for a in over)
        return ids.transpose(moved).reshape(-1, group)
    if "replica_groups={}" in text:
        return np.arange(devices)[None]
    return None


def _mesh_axes(groups: np.ndarray | None, mesh: Mesh) -> tuple[str, ...] | None:
    """The mesh axes along which the devices of a group differ."""
    if groups is None or groups.shape[1] < 2:
        return () if groups is not None else None
    coords = np.stack(np.unravel_index(groups[0], tuple(mesh.shape.values())), axis=1)
    return tuple(a for i, a in enumerate(mesh.axis_names) if len(set(coords[:, i])) > 1)


@dataclasses.dataclass
class Collective:
    kind: str
    axes: tuple[str, ...] | None  # None: groups not understood
    group_size: int
    sites: int = 0  # instructions in the program (a scanned layer's count once)
    count: int = 0  # per step, loops counted by trip count
    bytes: float = 0.0  # per device per step, the result's bytes times count

    @property
    def moved_bytes(self) -> float:
        """Bytes a device sends in a ring implementation: (n - 1) / n of the data, twice for
        an all-reduce (reduce-scatter then all-gather)."""
        n = max(self.group_size, 1)
        share = (n - 1) / n
        return self.bytes * share * (2 if self.kind == "all-reduce" else 1)


def collectives(hlo: str, mesh: Mesh) -> list[Collective]:
    """Every collective of the optimized per-device HLO, grouped by kind and mesh axes."""
    comps, entry = _computations(hlo)
    times = _multiplicity(comps, entry)
    table: dict[tuple, Collective] = {}
    devices = mesh.devices.size
    for name, lines in comps.items():
        n = times.get(name, 0)
        if not n:
            continue
        for line in lines:
            match = _INSTRUCTION.search(line)
            if not match:
                continue
            kind = match.group("op")
            sizes = _array_bytes(match.group("type"))
            nbytes = max(sizes, default=0) if match.group("start") else sum(sizes)
            groups = _group_ids(line, devices)
            axes = _mesh_axes(groups, mesh)
            size = groups.shape[1] if groups is not None else devices
            entry_ = table.setdefault((kind, axes), Collective(kind, axes, size))
            entry_.sites += 1
            entry_.count += n
            entry_.bytes += n * nbytes
    return sorted(table.values(), key=lambda c: -c.bytes)


# ---------------------------------------------------------------------------------------------
# Memory and the roofline.


def device_bytes(tree) -> int:
    """Bytes of the abstract arrays in `tree` on one device (their shardings' shard shapes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "sharding") and hasattr(leaf, "shape"):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def memory(compiled, arg_groups: dict[str, object], target: Target) -> dict[str, float]:
    """Per-device bytes: each argument group, temporaries, generated code, total, the HBM and
    the headroom (as fractions of HBM)."""
    stats = compiled.memory_analysis()
    out = {name: float(device_bytes(tree)) for name, tree in arg_groups.items()}
    out["padding, other arguments"] = max(stats.argument_size_in_bytes - sum(out.values()), 0.0)
    out["temporaries"] = float(stats.temp_size_in_bytes)
    out["outputs (not aliased)"] = float(
        max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0)
    )
    out["generated code"] = float(stats.generated_code_size_in_bytes)
    out["arguments"] = float(stats.argument_size_in_bytes)
    out["total"] = float(
        stats.argument_size_in_bytes
        + out["outputs (not aliased)"]
        + stats.temp_size_in_bytes
        + stats.generated_code_size_in_bytes
    )
    out["hbm"] = float(target.hbm_per_device)
    out["headroom"] = 1.0 - out["total"] / out["hbm"]
    return out


def roofline(
    flops_per_device: float, hbm_bytes: float, comms: list[Collective], target: Target
) -> dict[str, float]:
    """Lower bounds on one step's seconds per chip from compute, HBM and ICI traffic."""
    chip = target.chip
    per_chip = target.devices_per_chip
    compute = flops_per_device * per_chip / chip.peak_flops
    memory_s = hbm_bytes * per_chip / chip.hbm_bandwidth
    ici = sum(c.moved_bytes for c in comms) * per_chip / chip.ici_bandwidth
    bound = max(compute, memory_s, ici)
    return {
        "compute_s": compute,
        "hbm_s": memory_s,
        "collectives_s": ici,
        "step_s_bound": bound,
        "limited_by": {compute: "compute", memory_s: "HBM bandwidth", ici: "ICI"}[bound],
    }


# ---------------------------------------------------------------------------------------------
# Out of memory.


def out_of_memory(error: Exception, arg_groups: dict[str, object], target: Target) -> dict | None:
    """The facts of a compile that ran out of HBM (None if `error` is another error): bytes
    needed and available per device, what the arguments take, the largest argument arrays, and
    what to change."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    figures = [_gib(v, u) for v, u in re.findall(r"\(([\d.]+)([KMGT])\)?", text)]
    hbm = float(target.hbm_per_device)
    arguments = {name: float(device_bytes(tree)) for name, tree in arg_groups.items()}
    temporaries = figures[0] if "temporaries" in text and figures else None
    largest = sorted(
        (
            (device_bytes(leaf), jax.tree_util.keystr(path), leaf)
            for name, tree in arg_groups.items()
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "sharding")
        ),
        key=lambda x: -x[0],
    )[:5]
    return {
        "message": text.splitlines()[0][:300],
        "hbm": hbm,
        "arguments": arguments,
        "temporaries": temporaries,
        "needed": (temporaries or 0.0) + sum(arguments.values()),
        "largest_arguments": [
            (path, str(leaf.sharding.shard_shape(leaf.shape)), nbytes)
            for nbytes, path, leaf in largest
        ],
    }


def _gib(value: str, unit: str) -> float:
    return float(value) * {"K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}[unit]


def gathered_arrays(hlo: str, shapes: list[tuple[int, ...]]) -> list[str]:
    """The all-gather instructions whose result holds an array of one of `shapes` (e.g. a
    layer's whole expert weights, which expert parallelism must never gather)."""
    wanted = {",".join(map(str, s)) for s in shapes}
    out = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.search(line)
        if match and match.group("op") == "all-gather":
            dims = {d for _, d in _ARRAY.findall(match.group("type"))}
            if dims & wanted:
                out.append(line.strip()[:200])
    return out
