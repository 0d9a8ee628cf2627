"""TPU slices by the names people rent them under, and the chip figures a roofline needs.

    v5p-128, v4-32, tpu7x-16   3D tori, named by TensorCores (2 per chip): v5p-128 is 64 chips
    v5e-16, v6e-256            2D tori, named by chips (1 TensorCore each): v6e-16 is 16 chips
    v5p:4x4x4, v6e:4x4         raw topology strings, chips per torus axis, passed through

`Target.devices()` gives the compile-only devices libtpu describes for the slice (no TPU is
touched): a mesh over them compiles with the real TPU compiler on a CPU host. Multi-slice
targets (`num_slices` > 1) add a `slice_index` to each device; sharding.make_mesh lays the
`data` axis over the slices (DCN) and the rest within each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re

from jax.experimental import topologies

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's per-chip figures (vendor pages; see `source`)."""

    generation: str  # as in slice names: "v5p"
    device_kind: str  # as jax reports it: "TPU v5"
    torus_dims: int  # 2 or 3
    cores_per_chip: int  # TensorCores; 3D generations' slice names count these
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bidirectional bytes/s per chip, all links together
    dcn_bandwidth: float | None  # bytes/s per chip between slices, where published
    max_chips: int  # the largest slice (one pod) Cloud TPU offers
    source: str

    @property
    def names_count_cores(self) -> bool:
        return self.torus_dims == 3


# fmt: off
CHIPS = {c.generation: c for c in (
    Chip("v4", "TPU v4", 3, 2, 275e12, 32 * GiB, 1.2e12, 300e9, None, 4096,
         "cloud.google.com/tpu/docs/v4 (ICI: 6 links x 50 GB/s)"),
    Chip("v5e", "TPU v5 lite", 2, 1, 197e12, 16 * GiB, 819e9, 400e9, None, 256,
         "cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 3, 2, 459e12, 95 * GiB, 2765e9, 1200e9, 50e9 / 8, 8960,
         "cloud.google.com/tpu/docs/v5p (DCN: 50 Gbps per chip)"),
    Chip("v6e", "TPU v6 lite", 2, 1, 918e12, 32 * GiB, 1638e9, 800e9, None, 256,
         "cloud.google.com/tpu/docs/v6e"),
    Chip("tpu7x", "TPU7x", 3, 2, 2307e12, 192 * GiB, 7380e9, 1200e9, None, 9216,
         "cloud.google.com/tpu/docs/tpu7x (HBM and ICI: Ironwood announcement figures)"),
)}
# fmt: on
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v7x": "tpu7x", "ironwood": "tpu7x"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice (or `num_slices` identical slices) to compile for."""

    name: str  # as the user wrote it
    chip: Chip
    topology: str  # libtpu's "v5p:4x4x4"
    num_slices: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.topology.split(":")[1].split("x"))

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def devices_per_chip(self) -> int:
        """Devices jax sees per chip (two TensorCores each on v4 and tpu7x compile-only)."""
        return max(len(self.devices()) // self.chips, 1)

    @property
    def hbm_per_device(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip

    def devices(self) -> list:
        """The compile-only TPU devices of this target (all slices)."""
        return list(_devices(self.topology, self.num_slices))

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        kind = self.chip.device_kind
        return f"{self.name} ({self.topology}{slices}: {self.chips} chips of {kind})"


_CHIPS_PER_HOST = (2, 2, 1)  # libtpu's default host: 4 chips


@functools.lru_cache(maxsize=16)
def _devices(topology: str, num_slices: int) -> tuple:
    # libtpu takes a host-wide lock meant for processes that drive TPU chips; compile-only
    # devices drive none, so several processes (pytest workers) may describe slices at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    shape = [int(n) for n in topology.split(":")[1].split("x")] + [1]
    hosts = tuple(min(n, bound) for n, bound in zip(shape, _CHIPS_PER_HOST, strict=False))
    if hosts != _CHIPS_PER_HOST:  # a slice smaller than one host (v5e-1, v6e-2)
        kwargs["chips_per_host_bounds"] = hosts
    try:
        with _startup_placeholders():
            devices = topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise ValueError(
            f"topology {topology!r}: libtpu cannot describe it ({str(e).splitlines()[0]}); "
            'install it with pip install "jax[tpu]" (the version jax pins)'
        ) from None
    return tuple(devices)


@contextlib.contextmanager
def _startup_placeholders():
    """On a host without TPUs libtpu's start-up asks for the accelerator type and the worker
    hostnames, and warns; placeholders quiet it (a TPU VM sets its own). They are removed
    again at once: JAX reads TPU_WORKER_HOSTNAMES as "this is a TPU pod" (and so would any
    process started from this one), and compile-only devices take their topology from the
    target alone."""
    placeholders = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost"}
    added = [k for k in placeholders if k not in os.environ]
    os.environ.update({k: placeholders[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            del os.environ[k]


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The usual torus of `chips` (a power of two): axes as equal as possible, the smaller
    first (v5p-256: 4x4x8; v6e-32: 4x8); 4 chips in 3D is 2x2x1, as Cloud TPU names it."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: not a power of two; give the topology (v5p:16x16x24)")
    exponent = chips.bit_length() - 1
    per_axis = [exponent // dims + (i >= dims - exponent % dims) for i in range(dims)]
    shape = [2**e for e in per_axis]
    if dims == 3 and chips <= 4:
        shape = sorted(shape, reverse=True)  # 2x2x1, 2x1x1
    return tuple(shape)


def is_generation(text: str) -> bool:
    """Whether `text` names a generation alone (v5p, v6e), not a slice."""
    key = text.strip().lower()
    return _ALIASES.get(key, key) in CHIPS


def slice_targets(generation: str, num_slices: int = 1, min_chips: int = 1) -> list[Target]:
    """A generation's slices (the usual tori, power-of-two chip counts up to one pod), smallest
    first: what a search for the smallest slice that fits walks through."""
    key = generation.strip().lower()
    if not is_generation(key):
        raise ValueError(
            f"--topology={generation!r}: expected a generation ({sorted(CHIPS)}) to search its "
            "slices, a slice name such as v5p-128, or a topology such as v5p:4x4x4"
        )
    chip = CHIPS[_ALIASES.get(key, key)]
    per_chip = chip.cores_per_chip if chip.names_count_cores else 1
    smallest = 4 if chip.torus_dims == 3 else 1  # 3D slices start at one host (2x2x1)
    counts = (2**e for e in range(chip.max_chips.bit_length()))
    return [
        parse_target(f"{chip.generation}-{n * per_chip}", num_slices)
        for n in counts
        if max(smallest, min_chips) <= n <= chip.max_chips
    ]


def parse_target(text: str, num_slices: int = 1) -> Target:
    """A Target from a slice name (v5p-128, v6e-16, tpu7x-16, v4-32, v5e-256) or a topology
    string (v5p:4x4x4)."""
    name = text.strip().lower()
    generations = sorted([*CHIPS, *_ALIASES], key=len, reverse=True)
    match = re.fullmatch(rf"({'|'.join(generations)})([-:])([0-9x]+)", name)
    if not match or num_slices < 1:
        raise ValueError(
            f"--topology={text!r}: expected a slice name such as v5p-128, v6e-16, v5e-256, v4-32 "
            f"or tpu7x-16, or a topology such as v5p:4x4x4 (generations: {sorted(CHIPS)})"
        )
    generation, sep, size = match.groups()
    chip = CHIPS[_ALIASES.get(generation, generation)]
    if sep == ":":
        shape = tuple(int(n) for n in size.split("x"))
        if len(shape) != chip.torus_dims or min(shape) < 1:
            raise ValueError(
                f"--topology={text!r}: {chip.generation} slices are {chip.torus_dims}D tori "
                f"(e.g. {chip.generation}:{'x'.join(['4'] * chip.torus_dims)})"
            )
    else:
        count = int(size)
        per_chip = chip.cores_per_chip if chip.names_count_cores else 1
        if count % per_chip:
            raise ValueError(
                f"--topology={text!r}: {chip.generation} slice names count TensorCores, "
                f"{per_chip} per chip; expected a multiple of {per_chip}"
            )
        try:
            shape = torus_shape(count // per_chip, chip.torus_dims)
        except ValueError as e:
            raise ValueError(f"--topology={text!r}: {e}") from None
    topology = f"{chip.generation}:{'x'.join(map(str, shape))}"
    return Target(text, chip, topology, num_slices)
