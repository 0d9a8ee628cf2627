"""Expert dispatch: run every token's chosen experts and mix their outputs.

Four implementations behind `experts()`, equal to each other whenever nothing is dropped:

  dense     every expert on every token, then each token keeps its chosen outputs. The simple
            reference: E / A times the FLOPs; for tests, never for speed.
  gather    each assignment's expert matrices gathered and applied to its token: for a handful
            of tokens only (decoding).
  dropless  MegaBlocks-style (what DBRX was trained with): sort the (token, slot) assignments by
            expert, one grouped GEMM per projection over the sorted rows, unsort, combine.
  capacity  GShard-style: each expert takes at most C = ceil(capacity_factor * M * A / E)
            assignments into an [E, C, D] buffer for batched einsums; the rest are dropped.

Which one a model runs is decided by its plan (moe/plan.py). Dropless and capacity both move
token rows into a `RowLayout` and back (`dispatch_rows`, `collect_rows`); the expert-parallel
exchange (moe/exchange.py) reuses the same pieces.

Shape letters as in dbrx_jax/model/__init__.py: M tokens (the batch flattened), A a token's
slots, R = M * A assignments, P rows of a layout, U its groups, C slots per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from dbrx_jax.lora import project
from dbrx_jax.moe.gmm import GroupedMatmul
from dbrx_jax.nn import at_least_fp32, saved_for_backward

DISPATCHES = ("dense", "gather", "dropless", "capacity")
Activation = Callable[[jax.Array], jax.Array]


def experts(
    x_MD: jax.Array,
    expert_ids_MA: jax.Array,
    weights_MA: jax.Array,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array | None,
    w2_EFD: jax.Array,
    *,
    act: Activation,
    impl: str,
    gmm: GroupedMatmul | str | None = None,
    capacity_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The GLU experts `(act(x @ w1_e) * (x @ v1_e)) @ w2_e` of each token's chosen experts,
    mixed by the router weights (in fp32). Returns `y_MD` and `dropped_MA` (True where the
    capacity path dropped an assignment; all False for the exact paths). `v1_EDF=None`: `w1_EDF`
    is the fused `[E, D, 2F]` of `fuse_gate_up`. `gmm`: the dropless path's grouped GEMM (a
    `GroupedMatmul` or a backend name)."""
    if impl not in DISPATCHES:
        raise ValueError(f"MoE dispatch {impl!r}: expected one of {DISPATCHES}")
    if impl == "dropless" and gmm is None:
        raise ValueError("dropless dispatch needs a grouped GEMM: pass gmm= (see moe/gmm.py)")
    gmm = GroupedMatmul(gmm) if isinstance(gmm, str) else gmm
    if v1_EDF is None and impl in ("dense", "gather"):  # fused weights: these take them apart
        w1_EDF, v1_EDF = jnp.split(w1_EDF, 2, axis=-1)
    dropped_MA = jnp.zeros(expert_ids_MA.shape, bool)
    if impl == "dense":
        y_MAD = _dense(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act)
    elif impl == "gather":
        y_MAD = _gather(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act)
    elif impl == "dropless":
        y_MAD = dropless(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act, gmm)
    else:
        y_MAD, dropped_MA = _capacity(
            x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor
        )
    return combine(y_MAD, weights_MA).astype(x_MD.dtype), dropped_MA


def combine(y_MAD: jax.Array, weights_MA: jax.Array) -> jax.Array:
    """The sum over a token's slots of weight * expert output, in (at least) fp32."""
    acc = at_least_fp32(y_MAD.dtype)
    return jnp.einsum("MAD,MA->MD", y_MAD.astype(acc), weights_MA.astype(acc))


def glu(x, w1, v1, w2, act: Activation, matmul):
    """`act(x @ w1) * (x @ v1) @ w2` with the given (grouped, batched or gathered) matmul; a
    weight with an adapter (`lora.LowRank`) adds its low-rank term by the same matmul. With
    `v1=None`, `w1` is the fused `[..., D, 2F]` = [w1 | v1] (see `fuse_gate_up`): one GEMM for
    gate and up."""
    with jax.named_scope("expert_gemm"):  # benchmarks/profiling.py attributes time by scope
        if v1 is None:
            gate_up = saved_for_backward(project(matmul, x, w1), "expert_gate_up")
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = saved_for_backward(project(matmul, x, w1), "expert_gate_up")
            up = saved_for_backward(project(matmul, x, v1), "expert_gate_up")
        return saved_for_backward(project(matmul, act(gate) * up, w2), "expert_down")


def fuse_gate_up(w1_EDF: jax.Array, v1_EDF: jax.Array) -> jax.Array:
    """[w1 | v1] along F: `[E, D, 2F]`, for `glu(..., v1=None)`. The parameters stay separate
    (the released layout); the concatenation is part of the step and its gradient splits."""
    return jnp.concatenate([w1_EDF, v1_EDF], axis=-1)


def _dense(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act):
    """1. y_e = expert e on every token, for all E experts.
    2. Each token keeps the outputs of its chosen experts, slot by slot."""

    def every_expert(x, w_EIO):  # x: [M, I] (the tokens) or [M, E, I] (per expert)
        return jnp.einsum("MI,EIO->MEO" if x.ndim == 2 else "MEI,EIO->MEO", x, w_EIO)

    y_MED = glu(x_MD, w1_EDF, v1_EDF, w2_EFD, act, every_expert)
    return jnp.take_along_axis(y_MED, expert_ids_MA[:, :, None], axis=1)


# `_gather` up to this many assignments: one vector-matrix product each (unrolled).
PRODUCTS_MAX = 16


def _gather(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act):
    """Each assignment's token times its expert's matrices: for a few tokens only (decoding).
    Up to PRODUCTS_MAX assignments, one vector-matrix product each, which reads its matrix in
    place (XLA fuses the slice into it; a decode step at batch 1 on CPU 2.6x faster than
    gathering the M * A matrices into a new array first, which is what larger calls do)."""
    M, A = expert_ids_MA.shape

    def chosen_experts(x, w_EIO):  # x: [M, I] (the tokens) or [M, A, I] (per assignment)
        if M * A > PRODUCTS_MAX:
            spec = "MI,MAIO->MAO" if x.ndim == 2 else "MAI,MAIO->MAO"
            return jnp.einsum(spec, x, w_EIO[expert_ids_MA])
        products = [
            (x[m] if x.ndim == 2 else x[m, a])
            @ jax.lax.dynamic_index_in_dim(w_EIO, expert_ids_MA[m, a], keepdims=False)
            for m in range(M)
            for a in range(A)
        ]
        return jnp.stack(products).reshape(M, A, -1)

    return glu(x_MD, w1_EDF, v1_EDF, w2_EFD, act, chosen_experts)


def dropless(
    x_MD,
    expert_ids_MA,
    w1_EDF,
    v1_EDF,
    w2_EFD,
    act,
    gmm: GroupedMatmul,
    max_rows=None,
    expected_rows=None,
) -> jax.Array:
    """1. Sort the assignments by expert (stable: token order within an expert) and give each a
       row in a layout where every expert's rows start on a multiple of the backend's
       alignment (1 for the kernels, a block for the CPU loop). Assignments to an expert id
       outside [0, E) are left out (the expert-parallel path uses this for experts held by other
       devices); `max_rows` bounds how many can remain (default all), `expected_rows` is how
       many are expected to (default `max_rows`; it sizes the CPU grouped GEMM's batched part).
    2. Gather the token rows into that layout; empty padding rows are zeros.
    3. Grouped GEMMs over the rows: act(x @ w1) * (x @ v1), then @ w2 (`v1=None`: w1 is the
       fused [w1 | v1], one GEMM for both).
    4. Each assignment reads its output row back into [M, A, D] (zeros if left out).
    Steps 2 and 4 move rows by a permutation; their backward passes are gathers through the
    inverse permutation (custom VJPs), not scatter-adds."""
    E = w1_EDF.shape[0]
    alignment = gmm.row_alignment(max_rows or expert_ids_MA.size, E)
    with jax.named_scope("permute"):
        layout = sorted_layout(expert_ids_MA, E, alignment, max_rows)
        x_PD = dispatch_rows(x_MD, layout)

    expected_rows = expected_rows or max_rows or expert_ids_MA.size

    def grouped(lhs_PI, rhs_EIO):
        return gmm(
            lhs_PI,
            rhs_EIO,
            layout.group_sizes_U,
            block_rows=alignment,
            expected_rows=expected_rows,
        )

    y_PD = glu(x_PD, w1_EDF, v1_EDF, w2_EFD, act, grouped)
    with jax.named_scope("permute"):
        return collect_rows(y_PD, layout)


# ---------------------------------------------------------------------------------------------
# Row layouts: where each assignment's token row goes, and the way back.


@struct.dataclass
class RowLayout:
    """Assignments placed into P rows, in U groups of consecutive rows.

    row_of_assignment_MA: the row of token m's slot a; P if it has none (dropped / left out).
    assignment_of_row_P: the flat assignment (m * A + a) in each row; R for empty rows.
    token_of_row_P: the token in each row; M for empty rows.
    group_sizes_U: rows of each group, empty rows included.
    """

    row_of_assignment_MA: jax.Array
    assignment_of_row_P: jax.Array
    token_of_row_P: jax.Array
    group_sizes_U: jax.Array


def _layout(group_MA, row_MA, num_rows, group_sizes_U) -> RowLayout:
    M, A = group_MA.shape
    R = M * A
    row_R = row_MA.reshape(R)
    assignment_of_row_P = (
        jnp.full(num_rows, R, jnp.int32)
        .at[row_R]
        .set(jnp.arange(R, dtype=jnp.int32), mode="drop", unique_indices=True)
    )
    return RowLayout(
        row_of_assignment_MA=row_MA,
        assignment_of_row_P=assignment_of_row_P,
        token_of_row_P=jnp.where(assignment_of_row_P < R, assignment_of_row_P // A, M),
        group_sizes_U=group_sizes_U,
    )


def sorted_layout(
    group_MA: jax.Array, num_groups: int, alignment: int = 1, max_rows: int | None = None
) -> RowLayout:
    """Groups packed one after the other in group order, each starting on a multiple of
    `alignment`; within a group, assignments in (token, slot) order. Group ids outside
    [0, num_groups) get no row. `max_rows`: at most this many assignments have a group."""
    M, A = group_MA.shape
    R = M * A
    max_rows = R if max_rows is None else max_rows
    num_rows = _round_up(max_rows + num_groups * (alignment - 1), alignment)
    group_R = group_MA.reshape(R)
    valid_R = (group_R >= 0) & (group_R < num_groups)
    key_R = jnp.where(valid_R, group_R, num_groups)  # the left-out sort last
    order_R = jnp.argsort(key_R, stable=True).astype(jnp.int32)
    sizes_U = jnp.bincount(key_R, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    padded_U = (sizes_U + alignment - 1) // alignment * alignment
    first_U = jnp.cumsum(sizes_U) - sizes_U
    padded_first_U = jnp.cumsum(padded_U) - padded_U
    sorted_group_R = key_R[order_R]  # the group at each sorted position
    last = num_groups - 1
    in_group_R = jnp.arange(R, dtype=jnp.int32) - first_U[jnp.minimum(sorted_group_R, last)]
    row_sorted_R = jnp.where(
        sorted_group_R < num_groups,
        padded_first_U[jnp.minimum(sorted_group_R, last)] + in_group_R,
        num_rows,
    )
    row_R = jnp.zeros(R, jnp.int32).at[order_R].set(row_sorted_R, unique_indices=True)
    return _layout(group_MA, row_R.reshape(M, A), num_rows, padded_U)


def slotted_layout(
    group_MA: jax.Array, position_MA: jax.Array, num_groups: int, slots_per_group: int
) -> RowLayout:
    """Every group owns `slots_per_group` rows; an assignment at `position` in its group's queue
    takes row group * slots + position, or none if its position is past the end."""
    keep_MA = (position_MA < slots_per_group) & (group_MA >= 0) & (group_MA < num_groups)
    num_rows = num_groups * slots_per_group
    row_MA = jnp.where(keep_MA, group_MA * slots_per_group + position_MA, num_rows)
    sizes_U = jnp.full(num_groups, slots_per_group, jnp.int32)
    return _layout(group_MA, row_MA.astype(jnp.int32), num_rows, sizes_U)


def queue_positions(group_MA: jax.Array, num_groups: int, *, slot_major: bool) -> jax.Array:
    """Each assignment's place in its group's queue. slot_major: every token's first choice
    before any second choice (GShard's priority); otherwise token by token."""
    M, A = group_MA.shape
    ordered = group_MA.T if slot_major else group_MA
    one_hot_RU = jax.nn.one_hot(ordered.reshape(M * A), num_groups, dtype=jnp.int32)
    before_RU = jnp.cumsum(one_hot_RU, axis=0) - one_hot_RU
    position_R = jnp.sum(before_RU * one_hot_RU, axis=1)
    return position_R.reshape(A, M).T if slot_major else position_R.reshape(M, A)


def _with_zero_row(rows: jax.Array) -> jax.Array:
    """`rows` `[n, D]` with a row of zeros appended: index n reads zeros."""
    return jnp.concatenate([rows, jnp.zeros((1, rows.shape[1]), rows.dtype)])


def dispatch_rows(x_MD: jax.Array, layout: RowLayout) -> jax.Array:
    """`[P, D]`: each row's token (zeros for empty rows)."""
    return _dispatch_rows(x_MD, layout.token_of_row_P, layout.row_of_assignment_MA)


def collect_rows(y_PD: jax.Array, layout: RowLayout) -> jax.Array:
    """`[M, A, D]`: every assignment's output row (zeros for assignments without a row)."""
    return _collect_rows(y_PD, layout.row_of_assignment_MA, layout.assignment_of_row_P)


@jax.custom_vjp
def _dispatch_rows(x_MD, token_of_row_P, row_of_assignment_MA):
    return _with_zero_row(x_MD)[token_of_row_P]


def _dispatch_rows_fwd(x_MD, token_of_row_P, row_of_assignment_MA):
    return _dispatch_rows(x_MD, token_of_row_P, row_of_assignment_MA), row_of_assignment_MA


def _dispatch_rows_bwd(row_of_assignment_MA, g_PD):
    # A token's gradient: the sum of its rows' gradients, gathered through the inverse map.
    return _with_zero_row(g_PD)[row_of_assignment_MA].sum(axis=1), None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def _collect_rows(y_PD, row_of_assignment_MA, assignment_of_row_P):
    return _with_zero_row(y_PD)[row_of_assignment_MA]


def _collect_rows_fwd(y_PD, row_of_assignment_MA, assignment_of_row_P):
    return _collect_rows(y_PD, row_of_assignment_MA, assignment_of_row_P), assignment_of_row_P


def _collect_rows_bwd(assignment_of_row_P, g_MAD):
    g_RD = g_MAD.reshape(-1, g_MAD.shape[-1])
    return _with_zero_row(g_RD)[assignment_of_row_P], None, None


_collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# Capacity.


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def _capacity(x_MD, expert_ids_MA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor):
    """1. C = ceil(capacity_factor * M * A / E) slots per expert.
    2. Each assignment's position in its expert's queue, GShard's priority (all first choices
       before any second choice); those at position >= C are dropped.
    3. The kept assignments' token rows fill an [E, C, D] buffer (empty slots are zeros).
    4. Batched einsums over the buffer; every kept assignment reads back its slot's row."""
    M, A = expert_ids_MA.shape
    E, D, _ = w1_EDF.shape
    C = capacity_per_expert(M, A, E, capacity_factor)
    with jax.named_scope("permute"):
        position_MA = queue_positions(expert_ids_MA, E, slot_major=True)
        layout = slotted_layout(expert_ids_MA, position_MA, E, C)
        x_ECD = dispatch_rows(x_MD, layout).reshape(E, C, D)

    def batched(lhs_ECI, rhs_EIO):
        return jnp.einsum("ECI,EIO->ECO", lhs_ECI, rhs_EIO)

    y_PD = glu(x_ECD, w1_EDF, v1_EDF, w2_EFD, act, batched).reshape(E * C, D)
    with jax.named_scope("permute"):
        return collect_rows(y_PD, layout), position_MA >= C
