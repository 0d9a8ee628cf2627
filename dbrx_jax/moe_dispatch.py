"""Expert dispatch: run every token's chosen experts and mix their outputs.

Three implementations behind `experts()`, equal to each other whenever nothing is dropped:

  dense     every expert on every token, then each token keeps its chosen outputs. The simple
            reference: E / k times the FLOPs; for tests, never for speed.
  gather    each assignment's expert matrices gathered and applied to its token: for a few
            tokens only (`auto` picks it when decoding).
  dropless  MegaBlocks-style (what DBRX was trained with): sort the (token, slot) assignments by
            expert, one grouped GEMM per projection over the sorted rows, unsort, combine.
  capacity  GShard-style: each expert takes at most C = ceil(capacity_factor * T * k / E)
            assignments into an [E, C, D] buffer for batched einsums; the rest are dropped.

Dropless and capacity both move token rows into a `RowLayout` and back (`dispatch_rows`,
`collect_rows`); the expert-parallel exchange in moe_parallel.py reuses the same pieces.

Shape legend: T tokens (the batch flattened), D d_model, E experts, F expert hidden, A the
top_k slots of a token, R = T * A assignments, P rows of a layout, C capacity per expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from dbrx_jax.config import MOE_IMPLS
from dbrx_jax.gmm import grouped_matmul, row_alignment
from dbrx_jax.layers import at_least_fp32

# At most this many (token, slot) assignments, `auto` gathers each one's expert weights instead
# of sorting (a decode step: the block loop's overhead dwarfs a few rows' work).
GATHER_MAX_ASSIGNMENTS = 16


def resolve_moe_impl(impl: str, num_assignments: int | None = None) -> str:
    """`auto` is exact: `gather` for a handful of assignments (decoding), else `dropless` (no
    token dropped, as DBRX was trained; on CPU the fastest exact choice measured by
    experiments/bench_moe.py)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r}: expected one of {MOE_IMPLS}")
    if impl != "auto":
        return impl
    small = num_assignments is not None and num_assignments <= GATHER_MAX_ASSIGNMENTS
    return "gather" if small else "dropless"


def experts(
    x_TD: jax.Array,
    expert_ids_TA: jax.Array,
    weights_TA: jax.Array,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array | None,
    w2_EFD: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    impl: str = "auto",
    gmm_impl: str = "auto",
    capacity_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The GLU experts `(act(x @ w1_e) * (x @ v1_e)) @ w2_e` of each token's chosen experts,
    mixed by the router weights (in fp32). Returns `y_TD` and `dropped_TA` (True where the
    capacity path dropped an assignment; all False for the exact paths). `v1_EDF=None`: `w1_EDF`
    is the fused `[E, D, 2F]` of `fuse_gate_up`."""
    impl = resolve_moe_impl(impl, expert_ids_TA.size)
    if v1_EDF is None and impl in ("dense", "gather"):  # fused weights: these take them apart
        w1_EDF, v1_EDF = jnp.split(w1_EDF, 2, axis=-1)
    dropped_TA = jnp.zeros(expert_ids_TA.shape, bool)
    if impl == "dense":
        y_TAD = _dense(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act)
    elif impl == "gather":
        y_TAD = _gather(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act)
    elif impl == "dropless":
        y_TAD = dropless(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, gmm_impl)
    else:
        y_TAD, dropped_TA = _capacity(
            x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor
        )
    return combine(y_TAD, weights_TA).astype(x_TD.dtype), dropped_TA


def combine(y_TAD: jax.Array, weights_TA: jax.Array) -> jax.Array:
    """sum over a token's slots of weight * expert output, in (at least) fp32."""
    acc = at_least_fp32(y_TAD.dtype)
    return jnp.einsum("TAD,TA->TD", y_TAD.astype(acc), weights_TA.astype(acc))


def glu(x, w1, v1, w2, act, matmul):
    """`act(x @ w1) * (x @ v1) @ w2` with the given (grouped or batched) matmul. With `v1=None`,
    `w1` is the fused `[..., D, 2F]` = [w1 | v1] (see `fuse_gate_up`): one GEMM for gate and up."""
    with jax.named_scope("expert_gemm"):  # profiling.py attributes the step's time by scope
        if v1 is None:
            gate, up = jnp.split(checkpoint_name(matmul(x, w1), "expert_gate_up"), 2, axis=-1)
        else:
            gate = checkpoint_name(matmul(x, w1), "expert_gate_up")
            up = checkpoint_name(matmul(x, v1), "expert_gate_up")
        return checkpoint_name(matmul(act(gate) * up, w2), "expert_down")


def fuse_gate_up(w1_EDF: jax.Array, v1_EDF: jax.Array) -> jax.Array:
    """[w1 | v1] along F: `[E, D, 2F]`, for `glu(..., v1=None)`. The parameters stay separate
    (the released layout); the concatenation is part of the step and its gradient splits."""
    return jnp.concatenate([w1_EDF, v1_EDF], axis=-1)


def _dense(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act):
    """1. y_e = expert e on every token, for all E experts.
    2. Each token keeps the outputs of its chosen experts, slot by slot."""
    hidden_TEF = act(jnp.einsum("TD,EDF->TEF", x_TD, w1_EDF)) * jnp.einsum(
        "TD,EDF->TEF", x_TD, v1_EDF
    )
    y_TED = jnp.einsum("TEF,EFD->TED", hidden_TEF, w2_EFD)
    return jnp.take_along_axis(y_TED, expert_ids_TA[:, :, None], axis=1)


def _gather(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act):
    """Each assignment's expert matrices gathered and applied to its token: T * A copies of
    [D, F] matrices, so only for a few tokens (decoding)."""
    w1_TADF, v1_TADF, w2_TAFD = (w[expert_ids_TA] for w in (w1_EDF, v1_EDF, w2_EFD))
    hidden_TAF = act(jnp.einsum("TD,TADF->TAF", x_TD, w1_TADF)) * jnp.einsum(
        "TD,TADF->TAF", x_TD, v1_TADF
    )
    return jnp.einsum("TAF,TAFD->TAD", hidden_TAF, w2_TAFD)


def dropless(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, gmm_impl, max_rows=None):
    """1. Sort the assignments by expert (stable: token order within an expert) and give each a
       row in a layout where every expert's rows start on a multiple of the backend's block
       size (`row_alignment`: 1 for the kernels, up to 128 for the CPU block loop). Assignments to
       an expert id outside [0, E) are left out (the expert-parallel path uses this for experts
       held by other devices); `max_rows` bounds how many can remain (default all).
    2. Gather the token rows into that layout; empty padding rows are zeros.
    3. Grouped GEMMs over the rows: act(x @ w1) * (x @ v1), then @ w2 (`v1=None`: w1 is the
       fused [w1 | v1], one GEMM for both).
    4. Each assignment reads its output row back into [T, A, D] (zeros if left out).
    Steps 2 and 4 move rows by a permutation; their backward passes are gathers through the
    inverse permutation (custom VJPs), not scatter-adds."""
    E = w1_EDF.shape[0]
    alignment = row_alignment(gmm_impl, max_rows or expert_ids_TA.size, E)
    with jax.named_scope("permute"):
        layout = sorted_layout(expert_ids_TA, E, alignment, max_rows)
        x_PD = dispatch_rows(x_TD, layout)

    def gmm(lhs, rhs):
        return grouped_matmul(lhs, rhs, layout.group_sizes_G, impl=gmm_impl, block_rows=alignment)

    y_PD = glu(x_PD, w1_EDF, v1_EDF, w2_EFD, act, gmm)
    with jax.named_scope("permute"):
        return collect_rows(y_PD, layout)


# ---------------------------------------------------------------------------------------------
# Row layouts: where each assignment's token row goes, and the way back.


@struct.dataclass
class RowLayout:
    """Assignments placed into P rows, in G groups of consecutive rows.

    row_of_assignment_TA: the row of token t's slot a; P if it has none (dropped / left out).
    assignment_of_row_P: the flat assignment (t * A + a) in each row; R for empty rows.
    token_of_row_P: the token in each row; T for empty rows.
    group_sizes_G: rows of each group, empty rows included.
    """

    row_of_assignment_TA: jax.Array
    assignment_of_row_P: jax.Array
    token_of_row_P: jax.Array
    group_sizes_G: jax.Array


def _layout(group_TA, row_TA, num_rows, group_sizes_G) -> RowLayout:
    T, A = group_TA.shape
    R = T * A
    row_R = row_TA.reshape(R)
    assignment_of_row_P = (
        jnp.full(num_rows, R, jnp.int32)
        .at[row_R]
        .set(jnp.arange(R, dtype=jnp.int32), mode="drop", unique_indices=True)
    )
    return RowLayout(
        row_of_assignment_TA=row_TA,
        assignment_of_row_P=assignment_of_row_P,
        token_of_row_P=jnp.where(assignment_of_row_P < R, assignment_of_row_P // A, T),
        group_sizes_G=group_sizes_G,
    )


def sorted_layout(
    group_TA: jax.Array, num_groups: int, alignment: int = 1, max_rows: int | None = None
) -> RowLayout:
    """Groups packed one after the other in group order, each starting on a multiple of
    `alignment`; within a group, assignments in (token, slot) order. Group ids outside
    [0, num_groups) get no row. `max_rows`: at most this many assignments have a group."""
    T, A = group_TA.shape
    R = T * A
    max_rows = R if max_rows is None else max_rows
    num_rows = _round_up(max_rows + num_groups * (alignment - 1), alignment)
    flat_R = group_TA.reshape(R)
    valid_R = (flat_R >= 0) & (flat_R < num_groups)
    key_R = jnp.where(valid_R, flat_R, num_groups)  # the left-out sort last
    order_R = jnp.argsort(key_R, stable=True).astype(jnp.int32)
    sizes_G = jnp.bincount(key_R, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    padded_G = (sizes_G + alignment - 1) // alignment * alignment
    first_G = jnp.cumsum(sizes_G) - sizes_G
    padded_first_G = jnp.cumsum(padded_G) - padded_G
    group_R = key_R[order_R]  # of each sorted position
    in_group_R = jnp.arange(R, dtype=jnp.int32) - first_G[jnp.minimum(group_R, num_groups - 1)]
    row_sorted_R = jnp.where(
        group_R < num_groups,
        padded_first_G[jnp.minimum(group_R, num_groups - 1)] + in_group_R,
        num_rows,
    )
    row_R = jnp.zeros(R, jnp.int32).at[order_R].set(row_sorted_R, unique_indices=True)
    return _layout(group_TA, row_R.reshape(T, A), num_rows, padded_G)


def slotted_layout(
    group_TA: jax.Array, position_TA: jax.Array, num_groups: int, slots_per_group: int
) -> RowLayout:
    """Every group owns `slots_per_group` rows; an assignment at `position` in its group's queue
    takes row group * slots + position, or none if its position is past the end."""
    keep_TA = (position_TA < slots_per_group) & (group_TA >= 0) & (group_TA < num_groups)
    num_rows = num_groups * slots_per_group
    row_TA = jnp.where(keep_TA, group_TA * slots_per_group + position_TA, num_rows)
    sizes_G = jnp.full(num_groups, slots_per_group, jnp.int32)
    return _layout(group_TA, row_TA.astype(jnp.int32), num_rows, sizes_G)


def queue_positions(group_TA: jax.Array, num_groups: int, *, slot_major: bool) -> jax.Array:
    """Each assignment's place in its group's queue. slot_major: every token's first choice
    before any second choice (GShard's priority); otherwise token by token."""
    T, A = group_TA.shape
    ordered = group_TA.T if slot_major else group_TA
    one_hot_RG = jax.nn.one_hot(ordered.reshape(T * A), num_groups, dtype=jnp.int32)
    before_RG = jnp.cumsum(one_hot_RG, axis=0) - one_hot_RG
    position_R = jnp.sum(before_RG * one_hot_RG, axis=1)
    return position_R.reshape(A, T).T if slot_major else position_R.reshape(T, A)


def _with_zero_row(x_ND: jax.Array) -> jax.Array:
    return jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])


def dispatch_rows(x_TD: jax.Array, layout: RowLayout) -> jax.Array:
    """`[P, D]`: each row's token (zeros for empty rows)."""
    return _dispatch_rows(x_TD, layout.token_of_row_P, layout.row_of_assignment_TA)


def collect_rows(y_PD: jax.Array, layout: RowLayout) -> jax.Array:
    """`[T, A, D]`: every assignment's output row (zeros for assignments without a row)."""
    return _collect_rows(y_PD, layout.row_of_assignment_TA, layout.assignment_of_row_P)


@jax.custom_vjp
def _dispatch_rows(x_TD, token_of_row_P, row_of_assignment_TA):
    return _with_zero_row(x_TD)[token_of_row_P]


def _dispatch_rows_fwd(x_TD, token_of_row_P, row_of_assignment_TA):
    return _dispatch_rows(x_TD, token_of_row_P, row_of_assignment_TA), row_of_assignment_TA


def _dispatch_rows_bwd(row_of_assignment_TA, g_PD):
    # A token's gradient: the sum of its rows' gradients, gathered through the inverse map.
    return _with_zero_row(g_PD)[row_of_assignment_TA].sum(axis=1), None, None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def _collect_rows(y_PD, row_of_assignment_TA, assignment_of_row_P):
    return _with_zero_row(y_PD)[row_of_assignment_TA]


def _collect_rows_fwd(y_PD, row_of_assignment_TA, assignment_of_row_P):
    return _collect_rows(y_PD, row_of_assignment_TA, assignment_of_row_P), assignment_of_row_P


def _collect_rows_bwd(assignment_of_row_P, g_TAD):
    g_RD = g_TAD.reshape(-1, g_TAD.shape[-1])
    return _with_zero_row(g_RD)[assignment_of_row_P], None, None


_collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# Capacity.


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def _capacity(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor):
    """1. C = ceil(capacity_factor * T * A / E) slots per expert.
    2. Each assignment's position in its expert's queue, GShard's priority (all first choices
       before any second choice); those at position >= C are dropped.
    3. The kept assignments' token rows fill an [E, C, D] buffer (empty slots are zeros).
    4. Batched einsums over the buffer; every kept assignment reads back its slot's row."""
    T, A = expert_ids_TA.shape
    E, D, _ = w1_EDF.shape
    C = capacity_per_expert(T, A, E, capacity_factor)
    with jax.named_scope("permute"):
        position_TA = queue_positions(expert_ids_TA, E, slot_major=True)
        layout = slotted_layout(expert_ids_TA, position_TA, E, C)
        x_ECD = dispatch_rows(x_TD, layout).reshape(E, C, D)

    def batched(lhs, rhs):
        return jnp.einsum("ECK,EKN->ECN", lhs, rhs)

    y_PD = glu(x_ECD, w1_EDF, v1_EDF, w2_EFD, act, batched).reshape(E * C, D)
    with jax.named_scope("permute"):
        return collect_rows(y_PD, layout), position_TA >= C
