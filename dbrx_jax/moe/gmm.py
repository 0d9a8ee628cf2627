"""Grouped matrix multiplication: rows sorted by expert, times that expert's weight matrix.

    out[p] = lhs[p] @ rhs[e(p)]   where the rows of expert e are the e-th contiguous run of
                                  `group_sizes[e]` rows of `lhs`; rows past them are zeros.

Backends (`DbrxConfig.moe_gmm_impl`; `auto` is resolved for the target platform by moe/plan.py):
  ragged_dot  `jax.lax.ragged_dot`: the reference; TPU lowers it natively. XLA:GPU and XLA:CPU
              densify it (every row times every expert), so `auto` never picks it there.
  tokamax     `tokamax.ragged_dot`, the Pallas Mosaic GPU kernel (optional package).
  mgpu        JAX's own Hopper kernels (`ragged_dot_mgpu`, and `transposed_ragged_dot_mgpu` for
              the weight gradient) under a custom VJP; bf16 or fp16 on H100/H200. The VJP is
              tested on CPU with reference kernels in their place.
  megablox    JAX's TPU Pallas kernel; off TPU it runs in Pallas' interpreter (tests only: slow).
  blocked     a `lax.scan` over blocks of rows, each one expert's plain GEMM, with a
              hand-written backward; the groups must start on block boundaries
              (`row_alignment`). The CPU path.

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

BACKENDS = ("ragged_dot", "tokamax", "mgpu", "megablox", "blocked")
BLOCK_ROWS = 128  # the largest block of the CPU loop
_MEGABLOX_TILE = 128


def tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def default_backend(platform: str) -> str:
    """What `moe_gmm_impl="auto"` means on a platform (never the densified ragged_dot on GPU)."""
    if platform == "gpu":
        return "tokamax"
    return "blocked" if platform == "cpu" else "ragged_dot"


def for_platform(name: str, platform: str) -> GroupedMatmul:
    """The grouped GEMM `name` (a backend, or "auto") stands for on `platform`: "auto" is that
    platform's default, and megablox runs in Pallas' interpreter off TPU."""
    backend = default_backend(platform) if name == "auto" else name
    return GroupedMatmul(backend, interpret=backend == "megablox" and platform != "tpu")


TOKAMAX_MISSING = (
    "the 'tokamax' grouped GEMM needs the tokamax package (pip install tokamax; jax >= 0.11.1), "
    "which is not installed; XLA densifies jax.lax.ragged_dot on GPU. Install it, or set "
    "moe_gmm_impl='mgpu', moe_impl='capacity', or moe_gmm_impl='ragged_dot' knowingly."
)


@dataclasses.dataclass(frozen=True)
class GroupedMatmul:
    """One grouped-GEMM backend, ready to call: `gmm(lhs_PI, rhs_EIO, group_sizes_E)`.

    interpret: run megablox in Pallas' interpreter (off TPU)."""

    backend: str
    interpret: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(
                f"grouped-GEMM backend {self.backend!r}: expected one of {BACKENDS} "
                "('auto' is resolved by moe/plan.py for the target platform)"
            )

    def row_alignment(self, num_rows: int, num_groups: int) -> int:
        """Every group's first row must be a multiple of this in the rows given to the backend:
        the block loop's block size, at most BLOCK_ROWS but no more than the average group needs
        (a decode step has a handful of rows: 128-row blocks would be mostly padding)."""
        if self.backend != "blocked":
            return 1
        per_group = max(1, -(-num_rows // num_groups))
        return min(BLOCK_ROWS, max(8, 1 << (per_group - 1).bit_length()))

    def __call__(
        self,
        lhs_PI: jax.Array,
        rhs_EIO: jax.Array,
        group_sizes_E: jax.Array,
        *,
        block_rows: int = BLOCK_ROWS,
        preferred_element_type=None,
    ) -> jax.Array:
        """`[P, I] x [E, I, O] -> [P, O]`; `block_rows` is the alignment the rows were laid out
        with (the block loop's block)."""
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
            if lhs_PI.shape[0] % block_rows:
                raise ValueError(
                    f"blocked grouped GEMM: {lhs_PI.shape[0]} rows are not a multiple of "
                    f"the block of {block_rows}"
                )
            return _blocked_gmm(lhs_PI, rhs_EIO, group_sizes_E, block_rows).astype(out_dtype)
        if self.backend == "mgpu":
            return kernel_gmm(lhs_PI, rhs_EIO, group_sizes_E, MGPU_KERNELS).astype(out_dtype)
        return _megablox(lhs_PI, rhs_EIO, group_sizes_E, out_dtype, self.interpret)


# ---------------------------------------------------------------------------------------------
# blocked: a scan over blocks of rows.


def _block_experts(
    group_sizes_E: jax.Array, num_blocks: int, block_rows: int
) -> tuple[jax.Array, jax.Array]:
    """The expert of every block of rows, and whether the block holds any rows at all."""
    ends_E = jnp.cumsum(group_sizes_E)
    starts_W = jnp.arange(num_blocks) * block_rows
    expert_W = jnp.minimum(jnp.searchsorted(ends_E, starts_W, side="right"), len(ends_E) - 1)
    return expert_W, starts_W < ends_E[-1]


def _accumulator(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # fp32, or float64 for float64 inputs


def _blocked_forward(lhs_PI, rhs_EIO, group_sizes_E, block_rows):
    """One GEMM per block of rows with its expert's matrix; empty blocks skipped."""
    P, I = lhs_PI.shape
    W, O = P // block_rows, rhs_EIO.shape[2]
    expert_W, used_W = _block_experts(group_sizes_E, W, block_rows)
    acc = _accumulator(lhs_PI.dtype)

    def block(_, xs):
        rows, expert, used = xs  # rows: [block_rows, I]
        out = jax.lax.cond(
            used,
            lambda: jnp.matmul(rows, rhs_EIO[expert], preferred_element_type=acc),
            lambda: jnp.zeros((block_rows, O), acc),
        )
        return None, out.astype(lhs_PI.dtype)

    xs = (lhs_PI.reshape(W, block_rows, I), expert_W, used_W)
    return jax.lax.scan(block, None, xs)[1].reshape(P, O)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(lhs_PI, rhs_EIO, group_sizes_E, block_rows):
    return _blocked_forward(lhs_PI, rhs_EIO, group_sizes_E, block_rows)


def _blocked_gmm_fwd(lhs_PI, rhs_EIO, group_sizes_E, block_rows):
    out = _blocked_forward(lhs_PI, rhs_EIO, group_sizes_E, block_rows)
    return out, (lhs_PI, rhs_EIO, group_sizes_E)


def _blocked_gmm_bwd(block_rows, residuals, g_PO):
    """d lhs: the same block loop against the transposed matrices. d rhs: each block adds
    rows^T g into its expert's slice of an fp32 accumulator carried through the loop (autodiff
    of the forward would add a full [E, I, O] array per block instead)."""
    lhs_PI, rhs_EIO, group_sizes_E = residuals
    d_lhs_PI = _blocked_forward(g_PO, rhs_EIO.transpose(0, 2, 1), group_sizes_E, block_rows)
    P, I = lhs_PI.shape
    W, O = P // block_rows, g_PO.shape[1]
    expert_W, used_W = _block_experts(group_sizes_E, W, block_rows)
    acc = _accumulator(lhs_PI.dtype)

    def block(d_rhs_EIO, xs):
        rows, g_rows, expert, used = xs
        update_IO = jnp.matmul(rows.T, g_rows, preferred_element_type=acc)
        update_IO = jnp.where(used, update_IO, 0.0)
        # A dynamic slice update, done in place in the loop (a scatter-add would not be).
        d_rhs_EIO = jax.lax.dynamic_update_index_in_dim(
            d_rhs_EIO, d_rhs_EIO[expert] + update_IO, expert, 0
        )
        return d_rhs_EIO, None

    xs = (
        lhs_PI.reshape(W, block_rows, I),
        g_PO.reshape(W, block_rows, O),
        expert_W,
        used_W,
    )
    d_rhs_EIO, _ = jax.lax.scan(block, jnp.zeros(rhs_EIO.shape, acc), xs)
    return d_lhs_PI, d_rhs_EIO.astype(rhs_EIO.dtype), None


_blocked_gmm.defvjp(_blocked_gmm_fwd, _blocked_gmm_bwd)


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


def _megablox(lhs_PI, rhs_EIO, group_sizes_E, out_dtype, interpret: bool):
    # The TPU Pallas kernel, imported only when this backend runs.
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    P, I = lhs_PI.shape
    O = rhs_EIO.shape[2]
    # The kernel tiles rows by tm and wants whole tiles: pad rows; they belong to no group.
    tm = min(_MEGABLOX_TILE, _round_up(P, 8))
    padded = _round_up(P, tm)
    lhs = jnp.pad(lhs_PI, ((0, padded - P), (0, 0)))
    tiling = (tm, min(_MEGABLOX_TILE, I), min(_MEGABLOX_TILE, O))
    out = gmm(lhs, rhs_EIO, group_sizes_E, out_dtype, tiling, interpret=interpret)
    return _rows_in_groups(out[:P], group_sizes_E).astype(out_dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
