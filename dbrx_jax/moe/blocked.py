"""The CPU grouped GEMM (`moe_gmm_impl="blocked"`): a batched head and a chunked tail.

    out[p] = lhs[p] @ rhs[e(p)]   rows sorted by expert, expert e's group the e-th run of
                                  `group_sizes[e]` rows, each group starting on a multiple of
                                  `align` and its size a multiple of `align` (the padding rows
                                  are zeros); rows past the groups give zeros.

XLA:CPU's GEMM is most efficient on large operands, and a dot cannot read a slice of a stacked
weight in place: a loop over blocks of rows copies its expert's whole matrix for every block. So:

  head  the first C rows of every group (C = `head_rows`: about the rows an expert is expected
        to get) are gathered into an `[E, C, I]` block and multiplied by one batched GEMM. A
        group shorter than C reads zero rows.
  tail  the rows of groups longer than C, by a loop over those experts that reads each one's
        matrix once and multiplies its tail rows in chunks of BIG_CHUNK rows while they fill
        one, then of SMALL_CHUNK rows, the last one masked past the group's end.

The backward is hand-written: d lhs is the same head and tail against the transposed matrices
(dot dimension numbers, no transposed copy), d rhs the head's batched `lhs^T g` plus each
expert's tail chunks summed in the loop. `jax.lax.ragged_dot` is the reference it is tested
against (tests/test_moe_dispatch.py).

Shape letters as in dbrx_jax/model/__init__.py: P rows, I input features (the contraction), O
output features, E experts (groups), C head rows per expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ALIGN_ROWS = 16  # the largest alignment asked of the layout: little padding per group
BIG_CHUNK = 256  # tail GEMMs while rows fill them (512 or 128 made no difference)
SMALL_CHUNK = 32  # then these, the last one masked: most tails are short


def row_alignment(num_rows: int, num_groups: int) -> int:
    """Each group's first row is a multiple of this: ALIGN_ROWS, or less when the groups are
    small (a decode step has a handful of rows), but at least 8."""
    per_group = max(1, -(-num_rows // num_groups))
    return min(ALIGN_ROWS, max(8, 1 << (per_group - 1).bit_length()))


def head_rows(expected_rows: int, num_groups: int, align: int) -> int:
    """C: the expected rows of a group plus the half block of padding a group has on average,
    rounded up to `align`; a balanced routing then leaves little for the tail. (A larger head,
    1.15x or 1.3x the expected rows, made the dbrx-small training step slower.)"""
    per_group = -(-expected_rows // num_groups) + align // 2
    return max(align, -(-per_group // align) * align)


def grouped_matmul(lhs_PI, rhs_EIO, group_sizes_E, *, align: int, head: int):
    """`[P, I] x [E, I, O] -> [P, O]` (see the module docstring); `head`: C."""
    if lhs_PI.shape[0] % align:
        raise ValueError(
            f"blocked grouped GEMM: {lhs_PI.shape[0]} rows are not a multiple of the "
            f"alignment {align}"
        )
    return _gmm(lhs_PI, rhs_EIO, group_sizes_E.astype(jnp.int32), head)


def _accumulator(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)  # fp32, or float64 for float64 inputs


class _Head:
    """Where the head's rows come from and go to, for groups of `group_sizes_E` rows and a head
    of `head` (C) rows per group.

    row_EC: the row of each head slot (P, a zero row, past the group's end).
    slot_P: the head slot of each row (E * C, a zero row, for tail rows and rows past the
    groups). starts_E: the first row of each group."""

    def __init__(self, group_sizes_E, num_rows: int, head: int):
        self.group_sizes_E, self.head = group_sizes_E, head
        E = group_sizes_E.shape[0]
        ends_E = jnp.cumsum(group_sizes_E)
        self.starts_E = ends_E - group_sizes_E
        c = jnp.arange(head, dtype=jnp.int32)
        self.row_EC = jnp.where(c < group_sizes_E[:, None], self.starts_E[:, None] + c, num_rows)
        p = jnp.arange(num_rows, dtype=jnp.int32)
        expert_P = jnp.minimum(jnp.searchsorted(ends_E, p, side="right"), E - 1)
        in_group_P = p - self.starts_E[expert_P]
        in_head_P = (in_group_P < head) & (p < ends_E[-1])
        self.slot_P = jnp.where(in_head_P, expert_P * head + in_group_P, E * head)

    def gather(self, x_PI):
        """`[E, C, I]`: each group's first C rows."""
        return _with_zero_row(x_PI)[self.row_EC]

    def scatter(self, y_ECO):
        """`[P, O]`: each head row's output; zeros elsewhere."""
        E, C, O = y_ECO.shape
        return _with_zero_row(y_ECO.reshape(E * C, O))[self.slot_P]


def _with_zero_row(x):
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])


def _tail(start, size, head: int, num_rows: int, multiply, carry):
    """One expert's tail, rows `start + head` to `start + size`: `carry = multiply(c, at,
    valid, carry)` over chunks of the c rows from `at`, BIG_CHUNK ones while they fit, then
    SMALL_CHUNK ones. `valid` ([c] bool) marks the chunk's rows that are new rows of the group:
    the last small chunk may reach past the group's end, and past the last row it starts
    earlier (`at` before the next row), over rows already done."""
    end = start + size
    big, small = min(BIG_CHUNK, num_rows), min(SMALL_CHUNK, num_rows)

    def chunks(c, more):
        def step(state):
            row, carry = state
            at = jnp.minimum(row, num_rows - c)
            rows_c = at + jnp.arange(c)
            valid = (rows_c >= row) & (rows_c < end)
            return row + c, multiply(c, at, valid, carry)

        return lambda state: jax.lax.while_loop(lambda s: more(s[0]), step, state)

    state = (start + head, carry)
    state = chunks(big, lambda row: row + big <= end)(state)
    state = chunks(small, lambda row: row < end)(state)
    return state[1]


def _over_long_groups(group_sizes_E, head: int, expert, carry):
    """`carry = expert(e, carry)` for the experts whose groups are longer than the head, in
    expert order (the others cost nothing: their matrices are not read)."""
    long_E = group_sizes_E > head
    order_E = jnp.argsort(~long_E, stable=True)  # the long ones first, in expert order
    count = jnp.sum(long_E, dtype=jnp.int32)
    return jax.lax.fori_loop(0, count, lambda i, carry: expert(order_E[i], carry), carry)


def _matmul(lhs_PI, rhs_EIO, plan: _Head, transpose_rhs: bool):
    """Head and tail of `lhs @ rhs[e]` (`rhs[e].T` with transpose_rhs: d lhs)."""
    P = lhs_PI.shape[0]
    O = rhs_EIO.shape[1] if transpose_rhs else rhs_EIO.shape[2]
    acc = _accumulator(lhs_PI.dtype)
    spec = "ECI,EOI->ECO" if transpose_rhs else "ECI,EIO->ECO"
    y_ECO = jnp.einsum(spec, plan.gather(lhs_PI), rhs_EIO, preferred_element_type=acc)
    head_PO = plan.scatter(y_ECO.astype(lhs_PI.dtype))

    # Rows of a chunk outside its group keep what they hold (zeros, or rows done before): the
    # head is added after the loop.
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def expert(e, tail_PO):
        w = rhs_EIO[e]  # read once, for an expert with a tail

        def multiply(c, at, valid, tail_PO):
            rows = jax.lax.dynamic_slice_in_dim(lhs_PI, at, c)
            y = jax.lax.dot_general(rows, w, (contract, ((), ())), preferred_element_type=acc)
            kept = jax.lax.dynamic_slice_in_dim(tail_PO, at, c)
            y = jnp.where(valid[:, None], y.astype(lhs_PI.dtype), kept)
            return jax.lax.dynamic_update_slice_in_dim(tail_PO, y, at, 0)

        start, size = plan.starts_E[e], plan.group_sizes_E[e]
        return _tail(start, size, plan.head, P, multiply, tail_PO)

    tail_PO = _over_long_groups(
        plan.group_sizes_E, plan.head, expert, jnp.zeros((P, O), lhs_PI.dtype)
    )
    return head_PO + tail_PO


def _transposed(lhs_PI, g_PO, plan: _Head):
    """`[E, I, O]`: per expert, `lhs_rows^T g_rows` over its group (d rhs)."""
    acc = _accumulator(lhs_PI.dtype)
    head_EIO = jnp.einsum(
        "ECI,ECO->EIO", plan.gather(lhs_PI), plan.gather(g_PO), preferred_element_type=acc
    )
    P = lhs_PI.shape[0]

    def multiply(c, at, valid, d_IO):
        rows = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(lhs_PI, at, c), 0)
        g_rows = jax.lax.dynamic_slice_in_dim(g_PO, at, c)
        return d_IO + jax.lax.dot_general(
            rows, g_rows, (((0,), (0,)), ((), ())), preferred_element_type=acc
        )

    def expert(e, d_EIO):
        start, size = plan.starts_E[e], plan.group_sizes_E[e]
        d_IO = _tail(start, size, plan.head, P, multiply, d_EIO[e])
        return jax.lax.dynamic_update_index_in_dim(d_EIO, d_IO, e, 0)

    return _over_long_groups(plan.group_sizes_E, plan.head, expert, head_EIO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs_PI, rhs_EIO, group_sizes_E, head):
    plan = _Head(group_sizes_E, lhs_PI.shape[0], head)
    return _matmul(lhs_PI, rhs_EIO, plan, transpose_rhs=False)


def _gmm_fwd(lhs_PI, rhs_EIO, group_sizes_E, head):
    out = _gmm(lhs_PI, rhs_EIO, group_sizes_E, head)
    return out, (lhs_PI, rhs_EIO, group_sizes_E)


def _gmm_bwd(head, residuals, g_PO):
    lhs_PI, rhs_EIO, group_sizes_E = residuals
    g_PO = g_PO.astype(lhs_PI.dtype)
    plan = _Head(group_sizes_E, lhs_PI.shape[0], head)  # one for both gradients
    d_lhs = _matmul(g_PO, rhs_EIO, plan, transpose_rhs=True)
    d_rhs = _transposed(lhs_PI, g_PO, plan)
    return d_lhs, d_rhs.astype(rhs_EIO.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
