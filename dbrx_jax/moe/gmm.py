"""Grouped matrix multiplication: rows sorted by expert, times that expert's weight matrix.

    out[p] = lhs[p] @ rhs[e(p)]   where the rows of expert e are the e-th contiguous run of
                                  `group_sizes[e]` rows of `lhs`; rows past them are zeros.

Backends (`DbrxConfig.moe_gmm_impl`; `auto` is resolved for the target platform by moe/plan.py):
  ragged_dot  `jax.lax.ragged_dot`: the reference. XLA:GPU and XLA:CPU densify it (every row
              times every expert), XLA:TPU its weight gradient (`default_backend`), so `auto`
              never picks it.
  tokamax     `tokamax.ragged_dot`, the Pallas Mosaic GPU kernel (optional package).
  mgpu        JAX's own Hopper kernels (`ragged_dot_mgpu`, and `transposed_ragged_dot_mgpu` for
              the weight gradient) under a custom VJP; bf16 or fp16 on H100/H200. The VJP is
              tested on CPU with reference kernels in their place.
  megablox    JAX's TPU Pallas kernels (`auto` on TPU), tiled per shape and TPU generation
              (`megablox_tiling`); off TPU they run in Pallas' interpreter (tests only: slow).
  blocked     the CPU path (moe/blocked.py): the first rows of every group in one batched
              GEMM, the rest by a loop over experts in chunks, with a hand-written backward;
              the groups must start on multiples of `row_alignment`.

Shape letters as in dbrx_jax/model/__init__.py: P rows, I input features (the contraction),
O output features, E experts (groups), W blocks of rows.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dbrx_jax.moe import blocked

BACKENDS = ("ragged_dot", "tokamax", "mgpu", "megablox", "blocked")


def tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def default_backend(platform: str) -> str:
    """What `moe_gmm_impl="auto"` means on a platform (never a densified ragged_dot).

    TPU: megablox, not ragged_dot. XLA:TPU lowers ragged_dot's forward and d lhs to its own
    grouped kernels, but d rhs (the ragged dimension contracted, out [E, I, O]) to a masked
    dense convolution over every group: all rows times all E experts. Compiled for v5p, DBRX's
    FFN (8192 tokens x top-4, D 6144, F 10752, 16 experts, bf16) forward + backward costs
    2.34e14 FLOPs with ragged_dot against 3.90e13 with megablox (the three GEMMs' 3 x 3 x 2MDF
    exactly: 6x less), and 2.44 GiB of temporaries against 2.07 GiB."""
    if platform == "gpu":
        return "tokamax"
    return "blocked" if platform == "cpu" else "megablox"


def for_platform(name: str, platform: str, tpu: str | None = None) -> GroupedMatmul:
    """The grouped GEMM `name` (a backend, or "auto") stands for on `platform`: "auto" is that
    platform's default, and megablox runs in Pallas' interpreter off TPU. `tpu`: the TPU
    generation the program is compiled for (`tpu_generation`), which picks megablox's tiles."""
    backend = default_backend(platform) if name == "auto" else name
    return GroupedMatmul(
        backend,
        interpret=backend == "megablox" and platform != "tpu",
        tpu=tpu if platform == "tpu" else None,
    )


TOKAMAX_MISSING = (
    "the 'tokamax' grouped GEMM needs the tokamax package (pip install tokamax; jax >= 0.11.1), "
    "which is not installed; XLA densifies jax.lax.ragged_dot on GPU. Install it, or set "
    "moe_gmm_impl='mgpu', moe_impl='capacity', or moe_gmm_impl='ragged_dot' knowingly."
)


@dataclasses.dataclass(frozen=True)
class GroupedMatmul:
    """One grouped-GEMM backend, ready to call: `gmm(lhs_PI, rhs_EIO, group_sizes_E)`.

    interpret: run megablox in Pallas' interpreter (off TPU).
    tpu: the TPU generation compiled for ("v5p", "v6e", ...; None off TPU): megablox's tiles."""

    backend: str
    interpret: bool = False
    tpu: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(
                f"grouped-GEMM backend {self.backend!r}: expected one of {BACKENDS} "
                "('auto' is resolved by moe/plan.py for the target platform)"
            )

    def row_alignment(self, num_rows: int, num_groups: int) -> int:
        """Every group's first row must be a multiple of this in the rows given to the backend
        (1 but for the CPU path: `blocked.row_alignment`)."""
        return blocked.row_alignment(num_rows, num_groups) if self.backend == "blocked" else 1

    def __call__(
        self,
        lhs_PI: jax.Array,
        rhs_EIO: jax.Array,
        group_sizes_E: jax.Array,
        *,
        block_rows: int = 1,
        expected_rows: int | None = None,
        preferred_element_type=None,
    ) -> jax.Array:
        """`[P, I] x [E, I, O] -> [P, O]`. `block_rows`: the alignment the rows were laid out
        with (`row_alignment`); `expected_rows`: how many rows the groups are expected to hold
        together (default P), which sizes the CPU path's batched head."""
        out_dtype = preferred_element_type or lhs_PI.dtype
        group_sizes_E = group_sizes_E.astype(jnp.int32)
        if self.backend == "ragged_dot":
            return jax.lax.ragged_dot(
                lhs_PI, rhs_EIO, group_sizes_E, preferred_element_type=out_dtype
            )
        if self.backend == "tokamax":
            if not tokamax_available():
                raise RuntimeError(TOKAMAX_MISSING)
            import tokamax  # optional: GPU machines only

            return tokamax.ragged_dot(
                lhs_PI,
                rhs_EIO,
                group_sizes_E,
                preferred_element_type=out_dtype,
                implementation="mosaic",
            )
        if self.backend == "blocked":
            E = rhs_EIO.shape[0]
            head = blocked.head_rows(expected_rows or lhs_PI.shape[0], E, block_rows)
            out = blocked.grouped_matmul(
                lhs_PI, rhs_EIO, group_sizes_E, align=block_rows, head=head
            )
            return out.astype(out_dtype)
        if self.backend == "mgpu":
            return kernel_gmm(lhs_PI, rhs_EIO, group_sizes_E, MGPU_KERNELS).astype(out_dtype)
        return _megablox(lhs_PI, rhs_EIO, group_sizes_E, out_dtype, self.tpu, self.interpret)


# ---------------------------------------------------------------------------------------------
# A kernel pair under a custom VJP (mgpu).


class GmmKernels(NamedTuple):
    """A grouped-GEMM kernel pair for `kernel_gmm`:
    forward(lhs [P, I], rhs [E, I, O] (or [E, O, I] with transpose_rhs), group_sizes) -> [P, O]
    transposed(lhs [P, I], rhs [P, O], group_sizes) -> [E, I, O]: per group, lhs_g^T rhs_g."""

    forward: Callable[..., jax.Array]
    transposed: Callable[..., jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_gmm(lhs_PI, rhs_EIO, group_sizes_E, kernels: GmmKernels):
    """The grouped GEMM by a kernel pair; d lhs is the forward kernel against the transposed
    matrices, d rhs the transposed kernel. Rows past sum(group_sizes) are zeros both ways."""
    return _rows_in_groups(kernels.forward(lhs_PI, rhs_EIO, group_sizes_E), group_sizes_E)


def _kernel_gmm_fwd(lhs_PI, rhs_EIO, group_sizes_E, kernels):
    return kernel_gmm(lhs_PI, rhs_EIO, group_sizes_E, kernels), (lhs_PI, rhs_EIO, group_sizes_E)


def _kernel_gmm_bwd(kernels, residuals, g_PO):
    lhs_PI, rhs_EIO, group_sizes_E = residuals
    g_PO = g_PO.astype(lhs_PI.dtype)
    d_lhs_PI = kernels.forward(g_PO, rhs_EIO, group_sizes_E, transpose_rhs=True)
    d_rhs_EIO = kernels.transposed(lhs_PI, g_PO, group_sizes_E)
    return _rows_in_groups(d_lhs_PI, group_sizes_E), d_rhs_EIO.astype(rhs_EIO.dtype), None


kernel_gmm.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)


def _rows_in_groups(out_PO: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    rows_P = jnp.arange(out_PO.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(rows_P[:, None], out_PO, 0).astype(out_PO.dtype)


def _mgpu_tiles(n: int) -> tuple[int, int]:
    """(block_n, grid_block_n): the widest tiles that divide n (192 x 4 was the best of the
    configurations tried at the DBRX expert shape on an H200)."""
    for block_n in (192, 128, 64):
        for grid in (4, 2, 1):
            if n % (block_n * grid) == 0:
                return block_n, grid
    raise ValueError(f"moe_gmm_impl='mgpu' needs dimensions that are multiples of 64, got {n}")


def _mgpu_forward(lhs, rhs, group_sizes, transpose_rhs=False):
    # GPU-only kernels (Mosaic GPU), imported only when this backend runs.
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    block_n, grid = _mgpu_tiles(n)
    return ragged_dot_mgpu.ragged_dot(
        lhs,
        rhs,
        group_sizes=group_sizes,
        block_m=128,
        block_n=block_n,
        block_k=64,
        max_concurrent_steps=4,
        grid_block_n=grid,
        transpose_rhs=transpose_rhs,
    )


def _mgpu_transposed(lhs_PI, rhs_PO, group_sizes):
    # GPU-only kernels (Mosaic GPU), imported only when this backend runs.
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    I, O = lhs_PI.shape[1], rhs_PO.shape[1]
    block_n, grid = _mgpu_tiles(O)
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs_PI,
        rhs_PO,
        group_sizes=group_sizes,
        block_m=128 if I % 128 == 0 else 64,
        block_n=block_n,
        block_k=64,
        max_concurrent_steps=4,
        grid_block_n=grid,
    )


MGPU_KERNELS = GmmKernels(_mgpu_forward, _mgpu_transposed)


# ---------------------------------------------------------------------------------------------
# megablox: JAX's TPU kernels, `gmm` (forward, and d lhs against the transposed rhs) and `tgmm`
# (d rhs), with tiles chosen per shape and TPU generation.


class TpuGemm(NamedTuple):
    """What megablox's tiles are sized by, per TPU generation (per TensorCore).

    vmem: the scoped VMEM a Mosaic kernel gets by default (megablox asks for no more). Measured
      by compiling here: 16 MiB on v4, v5e and v5p, 32 MiB on v6e (physical VMEM is 16 MiB on
      v4, 64 MiB on v5p, 128 MiB on v5e and v6e).
    lanes: the MXU's width; k and n tiles are multiples of it where the dimension allows (v6e's
      MXU is 256 x 256, earlier ones 128 x 128).
    rows: the row tile (tm) to aim for. Every m tile streams its expert's whole [tk, tn] tiles of
      rhs from HBM, so tm is the kernel's FLOPs per byte of weights: it must reach the chip's
      ridge point (bf16 FLOP/s over HBM bytes/s: v4 275T / 1.2T = 230, v5e 197T / 0.82T = 240,
      v5p 459T / 2.8T = 166, v6e 918T / 1.6T = 560).
    """

    vmem: int
    lanes: int
    rows: int


_MIB = 1 << 20
TPU_GEMM = {
    "v4": TpuGemm(vmem=16 * _MIB, lanes=128, rows=256),
    "v5e": TpuGemm(vmem=16 * _MIB, lanes=128, rows=256),
    "v5p": TpuGemm(vmem=16 * _MIB, lanes=128, rows=256),
    "v6e": TpuGemm(vmem=32 * _MIB, lanes=256, rows=512),
}
# Another or a newer TPU (or megablox interpreted off TPU): v5p's tiles, which fit the smallest
# default VMEM and keep to multiples of 128.
_DEFAULT_GEMM = TPU_GEMM["v5p"]
# Of the scoped VMEM, what the tiles may take: Mosaic needs some for itself (measured: the
# estimate below is within 1 MiB of what the compiler reports).
_VMEM_FRACTION = 0.75
_MAX_TILE = 2048  # beyond this a tile only adds VMEM, not speed (the grid steps are few)
# Below this many rows a tile underfills the MXU (its weights are loaded per 128 x 128 pass).
_MIN_ROWS = 128


def tpu_generation(device_kind: str) -> str | None:
    """The TPU generation of a device kind ("TPU v5 lite" -> "v5e", "TPU v5" -> "v5p", "TPU v6
    lite" -> "v6e", "TPU v4" -> "v4"); None for what is not a TPU, the kind itself (lower case)
    for a TPU this table does not know."""
    kind = device_kind.strip().lower()
    if not kind.startswith("tpu"):
        return None
    known = {
        "tpu v4": "v4",
        "tpu v5 lite": "v5e",
        "tpu v5e": "v5e",
        "tpu v5": "v5p",
        "tpu v5p": "v5p",
        "tpu v6 lite": "v6e",
        "tpu v6e": "v6e",
    }
    return known.get(kind, kind.replace(" ", ""))


def megablox_vmem(tm: int, tk: int, tn: int, in_bytes: int = 2, out_bytes: int = 2) -> int:
    """VMEM (bytes) of megablox's kernels at tiles (tm, tk, tn): the larger of `gmm` (lhs
    [tm, tk] and rhs [tk, tn] in, out [tm, tn], each double-buffered, and an fp32 [tm, tn]
    accumulator) and `tgmm` (lhs [tm, tk] and rhs [tm, tn] in, out [tk, tn] and its fp32
    accumulator). One tiling serves all three calls of the custom VJP."""
    gmm = 2 * (tm * tk + tk * tn) * in_bytes + 2 * tm * tn * out_bytes + 4 * tm * tn
    tgmm = 2 * (tm * tk + tm * tn) * in_bytes + 2 * tk * tn * out_bytes + 4 * tk * tn
    return max(gmm, tgmm)


def megablox_rows(num_rows: int, num_groups: int, tpu: str | None) -> int:
    """The row tile tm. Each group's first and last tiles are shared with its neighbours and
    computed once per group, so up to `num_groups - 1` extra tiles: tm is at most the rows of an
    average group (but at least _MIN_ROWS), and no more than the rows there are (a multiple of
    8, the sublanes)."""
    chip = TPU_GEMM.get(tpu, _DEFAULT_GEMM)
    per_group = max(1, num_rows // num_groups)
    tm = min(chip.rows, max(_MIN_ROWS, 1 << (per_group.bit_length() - 1)))
    return min(tm, _round_up(num_rows, 8))


def _tile_candidates(dim: int, lanes: int) -> list[int]:
    """Tiles along a k or n dimension, widest first: multiples of the MXU width (else of 128, the
    lanes) that divide it, and the whole dimension (a block may always span the full array)."""
    for unit in (lanes, 128):
        tiles = [t for t in range(unit, min(dim, _MAX_TILE) + 1, unit) if dim % t == 0]
        if tiles:
            return sorted({*tiles, *([dim] if dim <= _MAX_TILE else [])}, reverse=True)
    # No multiple of 128 divides it: the whole dimension, or ragged 128-multiples (the kernels
    # mask a partial last k tile and write a partial last n tile).
    return sorted({dim, *range(128, min(dim, _MAX_TILE) + 1, 128)}, reverse=True)


@functools.lru_cache(maxsize=256)
def megablox_tiling(
    tm: int, k: int, n: int, tpu: str | None, in_bytes: int = 2, out_bytes: int = 2
) -> tuple[int, int, int]:
    """(tm, tk, tn) for a megablox call of k input and n output features: of the candidate k and
    n tiles (`_tile_candidates`) whose VMEM (`megablox_vmem`) fits the generation's budget,
    tiles that divide their dimensions first, then the most work per grid step (tk * tn).
    Ties go to the squarer pair (`tgmm` re-reads lhs n / tn times and rhs k / tk times), then
    to the wider tn (`gmm` re-reads lhs n / tn times)."""
    chip = TPU_GEMM.get(tpu, _DEFAULT_GEMM)
    budget = int(chip.vmem * _VMEM_FRACTION)
    best = None
    for tk in _tile_candidates(k, chip.lanes):
        for tn in _tile_candidates(n, chip.lanes):
            if megablox_vmem(tm, tk, tn, in_bytes, out_bytes) > budget:
                continue
            whole = k % tk == 0 and n % tn == 0  # a ragged last tile is a wasted pass
            key = (whole, tk * tn, min(tk, tn), tn)
            if best is None or key > best[0]:
                best = (key, (tm, tk, tn))
    if best is None:  # nothing fits: the smallest legal tiles
        return tm, min(k, 128), min(n, 128)
    return best[1]


@dataclasses.dataclass(frozen=True)
class MegabloxTiling:
    """megablox's `tiling` as a function of each call's (m, k, n): the forward, d lhs (k and n
    swapped) and d rhs (`tgmm`) calls of its custom VJP each get tiles for their own shape, with
    the row tile the rows were padded to. Hashable: it is a static argument of the kernel."""

    tm: int
    tpu: str | None
    in_bytes: int
    out_bytes: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        del m  # padded to a multiple of tm
        return megablox_tiling(self.tm, k, n, self.tpu, self.in_bytes, self.out_bytes)


def _megablox(lhs_PI, rhs_EIO, group_sizes_E, out_dtype, tpu: str | None, interpret: bool):
    # The TPU Pallas kernel, imported only when this backend runs.
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    P = lhs_PI.shape[0]
    E = rhs_EIO.shape[0]
    # The kernel tiles rows by tm and wants whole tiles: pad rows; they belong to no group.
    tm = megablox_rows(P, E, tpu)
    padded = _round_up(P, tm)
    lhs = jnp.pad(lhs_PI, ((0, padded - P), (0, 0)))
    item = max(lhs.dtype.itemsize, rhs_EIO.dtype.itemsize)
    tiling = MegabloxTiling(tm, tpu, item, max(item, jnp.dtype(out_dtype).itemsize))
    out = gmm(lhs, rhs_EIO, group_sizes_E, out_dtype, tiling, interpret=interpret)
    return _rows_in_groups(out[:P], group_sizes_E).astype(out_dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
