"""Grouped matrix multiplication: rows sorted by expert times that expert's weight matrix.

    out[r] = lhs[r] @ rhs[e(r)]   where rows of expert e are the e-th contiguous run of
                                  `group_sizes[e]` rows of `lhs`.

Backends (`DbrxConfig.gmm_impl`):
  ragged_dot  `jax.lax.ragged_dot`: the reference; TPU lowers it natively. On GPU, XLA densifies
              it (15x slower than a batched einsum at DBRX shapes), so `auto` never picks it there.
  tokamax     `tokamax.ragged_dot`, the Pallas Mosaic GPU kernel (optional package; jax >= 0.11.1).
  mgpu        JAX's own Hopper kernels (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, and
              `transposed_ragged_dot_mgpu` for the weight gradient) under a custom VJP; bf16 or
              fp16, H100/H200 only. Its VJP is tested on CPU with reference kernels in their
              place; the kernels themselves only on a GPU.
  megablox    JAX's TPU Pallas kernel (`jax.experimental.pallas.ops.tpu.megablox`); on other
              platforms it runs in Pallas interpret mode (tests only: slow).
  blocked     a `lax.scan` over blocks of 128 rows, each one expert's plain GEMM; the groups
              must start on block boundaries (`row_alignment`). XLA:CPU runs `ragged_dot` as a
              dense GEMM over every group (E times the work); this is 7x faster there.
  auto        blocked on CPU, ragged_dot on TPU, tokamax on GPU. (The mgpu forward kernel
              measured 680 TFLOP/s at the DBRX expert shape on an H200 against tokamax's 320
              untuned; `auto` keeps tokamax until the mgpu wrapper has been validated on a GPU.)
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dbrx_jax.config import GMM_IMPLS

_MEGABLOX_TILE = 128
BLOCK_ROWS = 128


def resolve_gmm_impl(impl: str, platform: str | None = None) -> str:
    """The backend `impl` stands for on `platform` (default: JAX's default backend)."""
    if impl not in GMM_IMPLS:
        raise ValueError(f"gmm_impl {impl!r}: expected one of {GMM_IMPLS}")
    platform = platform or jax.default_backend()
    if impl != "auto":
        return impl
    if platform == "gpu":
        if not tokamax_available():
            raise RuntimeError(
                "gmm_impl='auto' on GPU needs the tokamax package (pip install tokamax; jax >= "
                "0.11.1): XLA densifies jax.lax.ragged_dot on GPU. Install it, or choose "
                "moe_impl='capacity', or gmm_impl='ragged_dot' knowingly."
            )
        return "tokamax"
    return "blocked" if platform == "cpu" else "ragged_dot"


def row_alignment(impl: str, num_rows: int = 0, num_groups: int = 1) -> int:
    """Every expert's first row must be a multiple of this in the rows given to the backend:
    the block loop's block size, up to BLOCK_ROWS but no bigger than the average group needs
    (a decode step has a handful of rows: 128-row blocks would be mostly padding)."""
    if resolve_gmm_impl(impl) != "blocked":
        return 1
    per_group = max(1, -(-num_rows // num_groups)) if num_rows else BLOCK_ROWS
    return min(BLOCK_ROWS, max(8, 1 << (per_group - 1).bit_length()))


def tokamax_available() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def grouped_matmul(
    lhs_RK: jax.Array,
    rhs_EKN: jax.Array,
    group_sizes_E: jax.Array,
    *,
    impl: str = "auto",
    preferred_element_type=None,
    block_rows: int = BLOCK_ROWS,
) -> jax.Array:
    """`[R, K] x [E, K, N] -> [R, N]` with the rows grouped by expert (see module docstring).
    Rows past `sum(group_sizes)` come back as zeros."""
    impl = resolve_gmm_impl(impl)
    out_dtype = preferred_element_type or lhs_RK.dtype
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs_RK, rhs_EKN, group_sizes_E, preferred_element_type=out_dtype)
    if impl == "tokamax":
        import tokamax  # optional: only on GPU machines with jax >= 0.11.1

        return tokamax.ragged_dot(
            lhs_RK,
            rhs_EKN,
            group_sizes_E,
            preferred_element_type=out_dtype,
            implementation="mosaic",
        )
    if impl == "blocked":
        return _blocked(lhs_RK, rhs_EKN, group_sizes_E, out_dtype, block_rows)
    if impl == "mgpu":
        return kernel_gmm(lhs_RK, rhs_EKN, group_sizes_E, MGPU_KERNELS).astype(out_dtype)
    return _megablox(lhs_RK, rhs_EKN, group_sizes_E, out_dtype)


def _blocked(lhs_RK, rhs_EKN, group_sizes_E, out_dtype, block_rows):
    R = lhs_RK.shape[0]
    if R % block_rows:
        raise ValueError(f"gmm_impl='blocked' needs a multiple of {block_rows} rows, got {R}")
    return _blocked_gmm(lhs_RK, rhs_EKN, group_sizes_E, block_rows).astype(out_dtype)


def _block_experts(
    group_sizes_E: jax.Array, num_blocks: int, block_rows: int
) -> tuple[jax.Array, jax.Array]:
    """The expert of every block of rows, and whether the block holds any rows at all."""
    ends_E = jnp.cumsum(group_sizes_E)
    starts_B = jnp.arange(num_blocks) * block_rows
    expert_B = jnp.minimum(jnp.searchsorted(ends_E, starts_B, side="right"), len(ends_E) - 1)
    return expert_B, starts_B < ends_E[-1]


def _accumulator(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # fp32, or float64 for float64 inputs


def _blocked_forward(lhs_RK, rhs_EKN, group_sizes_E, block_rows):
    """One GEMM per block of rows with its expert's matrix; empty blocks skipped."""
    R, K = lhs_RK.shape
    num_blocks, N = R // block_rows, rhs_EKN.shape[2]
    expert_B, used_B = _block_experts(group_sizes_E, num_blocks, block_rows)
    acc = _accumulator(lhs_RK.dtype)

    def block(_, xs):
        x_bK, expert, used = xs
        y_bN = jax.lax.cond(
            used,
            lambda: jnp.matmul(x_bK, rhs_EKN[expert], preferred_element_type=acc),
            lambda: jnp.zeros((block_rows, N), acc),
        )
        return None, y_bN.astype(lhs_RK.dtype)

    xs = (lhs_RK.reshape(num_blocks, block_rows, K), expert_B, used_B)
    return jax.lax.scan(block, None, xs)[1].reshape(R, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(lhs_RK, rhs_EKN, group_sizes_E, block_rows):
    return _blocked_forward(lhs_RK, rhs_EKN, group_sizes_E, block_rows)


def _blocked_gmm_fwd(lhs_RK, rhs_EKN, group_sizes_E, block_rows):
    out = _blocked_forward(lhs_RK, rhs_EKN, group_sizes_E, block_rows)
    return out, (lhs_RK, rhs_EKN, group_sizes_E)


def _blocked_gmm_bwd(block_rows, residuals, g_RN):
    """d lhs: the same block loop against the transposed matrices. d rhs: each block adds
    x_b^T g_b into its expert's slice of an fp32 accumulator carried through the loop (autodiff
    of the forward would add a full [E, K, N] array per block instead)."""
    lhs_RK, rhs_EKN, group_sizes_E = residuals
    d_lhs = _blocked_forward(g_RN, rhs_EKN.transpose(0, 2, 1), group_sizes_E, block_rows)
    R, K = lhs_RK.shape
    num_blocks, N = R // block_rows, g_RN.shape[1]
    expert_B, used_B = _block_experts(group_sizes_E, num_blocks, block_rows)
    acc = _accumulator(lhs_RK.dtype)

    def block(d_rhs, xs):
        x_bK, g_bN, expert, used = xs
        update_KN = jnp.matmul(x_bK.T, g_bN, preferred_element_type=acc)
        update_KN = jnp.where(used, update_KN, 0.0)
        # A dynamic slice update, done in place in the loop (a scatter-add would not be).
        d_rhs = jax.lax.dynamic_update_index_in_dim(d_rhs, d_rhs[expert] + update_KN, expert, 0)
        return d_rhs, None

    xs = (
        lhs_RK.reshape(num_blocks, block_rows, K),
        g_RN.reshape(num_blocks, block_rows, N),
        expert_B,
        used_B,
    )
    d_rhs, _ = jax.lax.scan(block, jnp.zeros(rhs_EKN.shape, acc), xs)
    return d_lhs, d_rhs.astype(rhs_EKN.dtype), None


_blocked_gmm.defvjp(_blocked_gmm_fwd, _blocked_gmm_bwd)


class GmmKernels(NamedTuple):
    """A grouped-GEMM kernel pair for `kernel_gmm`:
    forward(lhs [R, K], rhs [E, K, N] (or [E, N, K] with transpose_rhs), group_sizes) -> [R, N]
    transposed(lhs [R, K], rhs [R, N], group_sizes) -> [E, K, N]: per group, lhs_g^T rhs_g."""

    forward: Callable[..., jax.Array]
    transposed: Callable[..., jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def kernel_gmm(lhs_RK, rhs_EKN, group_sizes_E, kernels: GmmKernels):
    """The grouped GEMM by a kernel pair; d lhs is the forward kernel against the transposed
    matrices, d rhs the transposed kernel. Rows past sum(group_sizes) are zeros both ways."""
    return _rows_in_groups(kernels.forward(lhs_RK, rhs_EKN, group_sizes_E), group_sizes_E)


def _kernel_gmm_fwd(lhs_RK, rhs_EKN, group_sizes_E, kernels):
    return kernel_gmm(lhs_RK, rhs_EKN, group_sizes_E, kernels), (lhs_RK, rhs_EKN, group_sizes_E)


def _kernel_gmm_bwd(kernels, residuals, g_RN):
    lhs_RK, rhs_EKN, group_sizes_E = residuals
    g_RN = g_RN.astype(lhs_RK.dtype)
    d_lhs = kernels.forward(g_RN, rhs_EKN, group_sizes_E, transpose_rhs=True)
    d_rhs = kernels.transposed(lhs_RK, g_RN, group_sizes_E)
    return _rows_in_groups(d_lhs, group_sizes_E), d_rhs.astype(rhs_EKN.dtype), None


kernel_gmm.defvjp(_kernel_gmm_fwd, _kernel_gmm_bwd)


def _rows_in_groups(out_RN: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    rows_R = jnp.arange(out_RN.shape[0]) < jnp.sum(group_sizes_E)
    return jnp.where(rows_R[:, None], out_RN, 0).astype(out_RN.dtype)


def _mgpu_tiles(n: int) -> tuple[int, int]:
    """(block_n, grid_block_n): the widest tiles that divide n (192 x 4 measured best at the
    DBRX expert shape on an H200)."""
    for block_n in (192, 128, 64):
        for grid in (4, 2, 1):
            if n % (block_n * grid) == 0:
                return block_n, grid
    raise ValueError(f"gmm_impl='mgpu' needs dimensions that are multiples of 64, got {n}")


def _mgpu_forward(lhs, rhs, group_sizes, transpose_rhs=False):
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


def _mgpu_transposed(lhs_RK, rhs_RN, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    K, N = lhs_RK.shape[1], rhs_RN.shape[1]
    block_n, grid = _mgpu_tiles(N)
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs_RK,
        rhs_RN,
        group_sizes=group_sizes,
        block_m=128 if K % 128 == 0 else 64,
        block_n=block_n,
        block_k=64,
        max_concurrent_steps=4,
        grid_block_n=grid,
    )


MGPU_KERNELS = GmmKernels(_mgpu_forward, _mgpu_transposed)


def _megablox(lhs_RK, rhs_EKN, group_sizes_E, out_dtype):
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    R, K = lhs_RK.shape
    N = rhs_EKN.shape[2]
    # The kernel tiles rows by tm and wants whole tiles: pad rows; they belong to no group.
    tm = min(_MEGABLOX_TILE, _round_up(R, 8))
    padded = _round_up(R, tm)
    lhs = jnp.pad(lhs_RK, ((0, padded - R), (0, 0)))
    tiling = (tm, min(_MEGABLOX_TILE, K), min(_MEGABLOX_TILE, N))
    out = gmm(
        lhs,
        rhs_EKN,
        group_sizes_E,
        out_dtype,
        tiling,
        interpret=jax.default_backend() != "tpu",
    )
    return _rows_in_groups(out[:R], group_sizes_E).astype(out_dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
