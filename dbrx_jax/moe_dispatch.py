"""Expert dispatch: run every token's chosen experts and mix their outputs.

Three implementations behind `experts()`, equal to each other whenever nothing is dropped:

  dense     every expert on every token, then each token keeps its chosen outputs. The simple
            reference: E / k times the FLOPs; for tests, never for speed.
  dropless  MegaBlocks-style (what DBRX was trained with): sort the (token, slot) assignments by
            expert, one grouped GEMM per projection over the sorted rows, unsort, combine.
  capacity  GShard-style: each expert takes at most C = ceil(capacity_factor * T * k / E)
            assignments into an [E, C, D] buffer for batched einsums; the rest are dropped.

Shape legend: T tokens (the batch flattened), D d_model, E experts, F expert hidden, A the
top_k slots of a token, R = T * A assignment rows, C capacity per expert, S = E * C slots.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from dbrx_jax.config import MOE_IMPLS
from dbrx_jax.gmm import grouped_matmul, row_alignment
from dbrx_jax.layers import at_least_fp32


def resolve_moe_impl(impl: str, platform: str | None = None) -> str:
    """`auto` is dropless everywhere: exact (no token dropped, as DBRX was trained) and, on CPU,
    the fastest exact choice measured (experiments/bench_moe.py)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r}: expected one of {MOE_IMPLS}")
    return "dropless" if impl == "auto" else impl


def experts(
    x_TD: jax.Array,
    expert_ids_TA: jax.Array,
    weights_TA: jax.Array,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array,
    w2_EFD: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    impl: str = "auto",
    gmm_impl: str = "auto",
    capacity_factor: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """The GLU experts `(act(x @ w1_e) * (x @ v1_e)) @ w2_e` of each token's chosen experts,
    mixed by the router weights (in fp32). Returns `y_TD` and `dropped_TA` (True where the
    capacity path dropped an assignment; all False for the exact paths)."""
    impl = resolve_moe_impl(impl)
    if impl == "dense":
        y_TAD = _dense(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act)
        dropped_TA = jnp.zeros(expert_ids_TA.shape, bool)
    elif impl == "dropless":
        y_TAD = _dropless(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, gmm_impl)
        dropped_TA = jnp.zeros(expert_ids_TA.shape, bool)
    else:
        y_TAD, dropped_TA = _capacity(
            x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor
        )
    return combine(y_TAD, weights_TA, x_TD.dtype), dropped_TA


def combine(y_TAD: jax.Array, weights_TA: jax.Array, dtype) -> jax.Array:
    """sum over a token's slots of weight * expert output, accumulated in fp32."""
    acc = at_least_fp32(y_TAD.dtype)
    y_TD = jnp.einsum("TAD,TA->TD", y_TAD.astype(acc), weights_TA.astype(acc))
    return y_TD.astype(dtype)


def _glu(x, w1, v1, w2, act, matmul):
    return matmul(act(matmul(x, w1)) * matmul(x, v1), w2)


def _dense(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act):
    """1. y_e = expert e on every token, for all E experts.
    2. Each token keeps the outputs of its chosen experts, slot by slot."""
    hidden_TEF = act(jnp.einsum("TD,EDF->TEF", x_TD, w1_EDF)) * jnp.einsum(
        "TD,EDF->TEF", x_TD, v1_EDF
    )
    y_TED = jnp.einsum("TEF,EFD->TED", hidden_TEF, w2_EFD)
    return jnp.take_along_axis(y_TED, expert_ids_TA[:, :, None], axis=1)


def _dropless(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, gmm_impl):
    """1. Sort the T * A assignments by expert (stable: token order within an expert) and give
       each a row in a layout where every expert's rows start on a multiple of the backend's
       block size (`row_alignment`: 1 for the kernels, 128 for the CPU block loop).
    2. Gather the token rows into that layout; empty padding rows are zeros.
    3. Grouped GEMMs over the rows: act(x @ w1) * (x @ v1), then @ w2.
    4. Each assignment reads its output row back into [T, A, D].
    Steps 2 and 4 move rows by a permutation; their backward passes are gathers through the
    inverse permutation (custom VJPs), not scatter-adds."""
    E = w1_EDF.shape[0]
    layout = sorted_layout(expert_ids_TA, E, row_alignment(gmm_impl))
    x_PD = dispatch_rows(x_TD, layout.token_of_row_P, layout.row_of_assignment_TA)

    def gmm(lhs, rhs):
        return grouped_matmul(lhs, rhs, layout.group_sizes_E, impl=gmm_impl)

    y_PD = _glu(x_PD, w1_EDF, v1_EDF, w2_EFD, act, gmm)
    return collect_rows(y_PD, layout.row_of_assignment_TA, layout.assignment_of_row_P)


@struct.dataclass
class SortedLayout:
    """Where each assignment sits in the expert-sorted, block-padded row layout (P rows).

    row_of_assignment_TA: the row of token t's slot a.
    assignment_of_row_P: the flat assignment (t * A + a) in each row; R for padding rows.
    token_of_row_P: the token in each row; T for padding rows.
    group_sizes_E: rows given to each expert, padding included (multiples of the alignment).
    """

    row_of_assignment_TA: jax.Array
    assignment_of_row_P: jax.Array
    token_of_row_P: jax.Array
    group_sizes_E: jax.Array


def sorted_layout(expert_ids_TA: jax.Array, num_experts: int, alignment: int) -> SortedLayout:
    T, A = expert_ids_TA.shape
    R = T * A
    P = _round_up(R + num_experts * (alignment - 1), alignment)  # room for the worst padding
    flat_ids_R = expert_ids_TA.reshape(R)
    order_R = jnp.argsort(flat_ids_R, stable=True).astype(jnp.int32)
    sizes_E = jnp.bincount(flat_ids_R, length=num_experts).astype(jnp.int32)
    padded_E = (sizes_E + alignment - 1) // alignment * alignment
    first_E = jnp.cumsum(sizes_E) - sizes_E
    padded_first_E = jnp.cumsum(padded_E) - padded_E
    expert_R = flat_ids_R[order_R]  # of each sorted position
    row_R = padded_first_E[expert_R] + jnp.arange(R, dtype=jnp.int32) - first_E[expert_R]
    row_of_assignment_R = jnp.zeros(R, jnp.int32).at[order_R].set(row_R, unique_indices=True)
    assignment_of_row_P = jnp.full(P, R, jnp.int32).at[row_R].set(order_R, unique_indices=True)
    token_of_row_P = jnp.where(assignment_of_row_P < R, assignment_of_row_P // A, T)
    return SortedLayout(
        row_of_assignment_TA=row_of_assignment_R.reshape(T, A),
        assignment_of_row_P=assignment_of_row_P,
        token_of_row_P=token_of_row_P,
        group_sizes_E=padded_E,
    )


def _with_zero_row(x_ND: jax.Array) -> jax.Array:
    return jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])


@jax.custom_vjp
def dispatch_rows(
    x_TD: jax.Array, token_of_row_P: jax.Array, row_of_assignment_TA: jax.Array
) -> jax.Array:
    """`[P, D]` rows: each row's token (zeros for padding rows)."""
    return _with_zero_row(x_TD)[token_of_row_P]


def _dispatch_rows_fwd(x_TD, token_of_row_P, row_of_assignment_TA):
    return dispatch_rows(x_TD, token_of_row_P, row_of_assignment_TA), row_of_assignment_TA


def _dispatch_rows_bwd(row_of_assignment_TA, g_PD):
    # A token's gradient: the sum of its A rows' gradients, gathered by the inverse map.
    return g_PD[row_of_assignment_TA].sum(axis=1), None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def collect_rows(
    y_PD: jax.Array, row_of_assignment_TA: jax.Array, assignment_of_row_P: jax.Array
) -> jax.Array:
    """`[T, A, D]`: every assignment's output row."""
    return y_PD[row_of_assignment_TA]


def _collect_rows_fwd(y_PD, row_of_assignment_TA, assignment_of_row_P):
    return y_PD[row_of_assignment_TA], assignment_of_row_P


def _collect_rows_bwd(assignment_of_row_P, g_TAD):
    g_RD = g_TAD.reshape(-1, g_TAD.shape[-1])
    return _with_zero_row(g_RD)[assignment_of_row_P], None, None


collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def expert_positions(expert_ids_TA: jax.Array, num_experts: int) -> jax.Array:
    """Each assignment's place in its expert's queue. Priority as GShard: every token's first
    choice before any second choice, and token order within a slot."""
    T, A = expert_ids_TA.shape
    one_hot_RE = jax.nn.one_hot(expert_ids_TA.T.reshape(A * T), num_experts, dtype=jnp.int32)
    before_RE = jnp.cumsum(one_hot_RE, axis=0) - one_hot_RE
    position_R = jnp.sum(before_RE * one_hot_RE, axis=1)
    return position_R.reshape(A, T).T


def _capacity(x_TD, expert_ids_TA, w1_EDF, v1_EDF, w2_EFD, act, capacity_factor):
    """1. C = ceil(capacity_factor * T * A / E) slots per expert.
    2. Each assignment's position in its expert's queue (`expert_positions`); those at
       position >= C are dropped.
    3. The kept assignments' token rows fill an [E, C, D] buffer (empty slots are zeros).
    4. Batched einsums over the buffer; every kept assignment reads back its slot's row."""
    T, A = expert_ids_TA.shape
    E, D, _ = w1_EDF.shape
    C = capacity_per_expert(T, A, E, capacity_factor)
    position_TA = expert_positions(expert_ids_TA, E)
    keep_TA = position_TA < C
    slot_TA = jnp.where(keep_TA, expert_ids_TA * C + position_TA, E * C)
    token_TA = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, A))
    token_of_slot_S = (
        jnp.full((E * C,), T, jnp.int32)
        .at[slot_TA.reshape(-1)]
        .set(token_TA.reshape(-1), mode="drop", unique_indices=True)
    )
    x_padded = jnp.concatenate([x_TD, jnp.zeros((1, D), x_TD.dtype)])  # row T: empty slot
    x_ECD = x_padded[token_of_slot_S].reshape(E, C, D)

    def batched(lhs, rhs):
        return jnp.einsum("ECK,EKN->ECN", lhs, rhs)

    y_SD = _glu(x_ECD, w1_EDF, v1_EDF, w2_EFD, act, batched).reshape(E * C, D)
    y_TAD = jnp.where(keep_TA[:, :, None], y_SD[jnp.minimum(slot_TA, E * C - 1)], 0)
    return y_TAD, ~keep_TA
