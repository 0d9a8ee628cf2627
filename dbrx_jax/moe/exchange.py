"""Expert parallelism: the dropless MoE under `jax.shard_map` over the plan's mesh.

Each device holds E / Q of every layer's experts (sharded over `expert`, their hidden dim over
`tensor`; the `fsdp` shards of D are gathered on the way in, as for any FSDP weight). Its tokens
are its own batch shard (split over data, fsdp and expert), already routed. Two ways for tokens
to reach their experts and come back, over the `expert` axis only (`moe_exchange`):

  all_gather  gather every token of the expert group, run the local experts on the assignments
              that chose them, and `psum_scatter` the partial outputs back to their owners.
              Sends each token once whatever top_k is: the better choice for DBRX's top-4.
  all_to_all  send each device exactly the rows of its experts (at most min(A, local experts)
              rows per token) in fixed-size buffers, run them, send the outputs back.

Expert weights are never gathered over `expert`. The `tensor` partial sums meet in one psum.
Shape letters as in dbrx_jax/model/__init__.py: Q devices along `expert`, C slots per
destination device; E inside `local` counts the experts one device holds.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dbrx_jax.lora import LowRank
from dbrx_jax.moe.dispatch import (
    Activation,
    collect_rows,
    combine,
    dispatch_rows,
    dropless,
    fuse_gate_up,
    queue_positions,
    slotted_layout,
)
from dbrx_jax.moe.plan import MoEPlan
from dbrx_jax.sharding import BATCH_AXES

log = logging.getLogger(__name__)


def sharded_experts(
    x_BTD: jax.Array,
    expert_ids_BTA: jax.Array,
    weights_BTA: jax.Array,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array,
    w2_EFD: jax.Array,
    *,
    act: Activation,
    plan: MoEPlan,
) -> jax.Array:
    """`dispatch.experts(impl="dropless")` for a batch and experts sharded over `plan.mesh`.
    Returns y_BTD, sharded like x_BTD. With `plan.fuse_gate_up`, each device concatenates its
    own blocks of w1 and v1 (both split over F by `tensor`) for one GEMM.

    A batch of fewer rows than the batch shards (decoding one sequence on eight devices, say)
    cannot be split: every device then holds all the tokens, runs its local experts on them, and
    the partial outputs are summed. That is decided here, from the static shape, and logged."""
    mesh = plan.mesh
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    replicated = x_BTD.shape[0] % batch_shards != 0
    if replicated:
        log.info(
            "MoE: a batch of %d rows does not split over the %d batch shards %s; tokens are "
            "replicated and each device runs its local experts on all of them (then a psum)",
            x_BTD.shape[0],
            batch_shards,
            BATCH_AXES,
        )
    batch = P() if replicated else P(BATCH_AXES)
    w13 = P("expert", None, "tensor")
    w2 = P("expert", "tensor", None)
    # An adapter goes with its experts: A whole over its input dim (as the weight, gathered
    # over fsdp), B split over F like w1 and v1; w2's A split over F (its partial products
    # are summed by the psum over `tensor` with the weight's).
    whole = P("expert", None, None)
    w13_1 = _adapted_spec(w1_EDF, w13, whole, w13)
    w13_v = _adapted_spec(v1_EDF, w13, whole, w13)
    w2 = _adapted_spec(w2_EFD, w2, w2, whole)
    adapted = any(isinstance(w, LowRank) for w in (w1_EDF, v1_EDF, w2_EFD))

    def local(x_BTD, ids_BTA, weights_BTA, w1, v1, w2):
        B, T, D = x_BTD.shape
        if plan.fuse_gate_up and not adapted:
            w1, v1 = fuse_gate_up(w1, v1), None
        args = (
            x_BTD.reshape(B * T, D),
            ids_BTA.reshape(B * T, -1),
            weights_BTA.reshape(B * T, -1),
            w1,
            v1,
            w2,
            act,
            plan,
        )
        if replicated:
            y_MD = jax.lax.psum(_local_only(*args), ("expert", "tensor"))
        else:
            exchange = _all_gather if plan.exchange == "all_gather" else _all_to_all
            y_MD = jax.lax.psum(exchange(*args), "tensor")
        return y_MD.astype(x_BTD.dtype).reshape(B, T, D)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(batch, batch, batch, w13_1, w13_v, w2),
        out_specs=batch,
        check_vma=False,
    )(x_BTD, expert_ids_BTA, weights_BTA, w1_EDF, v1_EDF, w2_EFD)


def _adapted_spec(w, spec: P, a_spec: P, b_spec: P) -> P | LowRank:
    """`spec` for a plain weight; the matching specs of a weight with an adapter."""
    return LowRank(spec, a_spec, b_spec, w.scale) if isinstance(w, LowRank) else spec


def _first_local_expert(num_local: int) -> jax.Array:
    return jax.lax.axis_index("expert") * num_local


def _local_only(x_MD, ids_MA, weights_MA, w1, v1, w2, act, plan):
    """Every token's assignments to this device's experts (fp32 partial outputs)."""
    E_local = w1.shape[0]
    M, A = ids_MA.shape
    Q = jax.lax.axis_size("expert")
    y_MAD = dropless(
        x_MD,
        ids_MA - _first_local_expert(E_local),
        w1,
        v1,
        w2,
        act,
        plan.gmm,
        max_rows=M * min(A, E_local),
        expected_rows=-(-M * A // Q),  # this device's share of a balanced routing
    )
    return combine(y_MAD, weights_MA)


def _all_gather(x_MD, ids_MA, weights_MA, w1, v1, w2, act, plan):
    """1. Gather the expert group's tokens, their choices and weights.
    2. Dropless over the assignments to this device's experts (the rest are left out).
    3. Combine into partial outputs for every gathered token (fp32) and reduce-scatter them
       back to the devices that own the tokens."""
    M, A = ids_MA.shape
    E_local = w1.shape[0]
    Q = jax.lax.axis_size("expert")
    # The group's tokens, device by device: Q * M rows of x, ids and weights.
    with jax.named_scope("expert_exchange"):
        x_group = jax.lax.all_gather(x_MD, "expert", tiled=True)
        ids_group = jax.lax.all_gather(ids_MA, "expert", tiled=True)
        weights_group = jax.lax.all_gather(weights_MA, "expert", tiled=True)
    local_ids = ids_group - _first_local_expert(E_local)  # outside [0, E_local): left out
    max_rows = Q * M * min(A, E_local)
    y_group = dropless(
        x_group, local_ids, w1, v1, w2, act, plan.gmm, max_rows=max_rows, expected_rows=M * A
    )  # expected: the group's assignments over Q devices
    partial_group = combine(y_group, weights_group)
    with jax.named_scope("expert_exchange"):
        return jax.lax.psum_scatter(partial_group, "expert", scatter_dimension=0, tiled=True)


def _all_to_all(x_MD, ids_MA, weights_MA, w1, v1, w2, act, plan):
    """1. Destination device of every assignment: its expert // E_local. Each destination gets
       C = M * min(A, E_local) slots (a token cannot send it more), filled in token order.
    2. all_to_all the slot rows and their local expert ids.
    3. Dropless over the received rows (empty slots left out).
    4. all_to_all the outputs back; each assignment reads its slot; combine (fp32)."""
    M, A = ids_MA.shape
    E_local, D = w1.shape[0], x_MD.shape[1]
    Q = jax.lax.axis_size("expert")
    C = M * min(A, E_local)
    destination_MA = ids_MA // E_local
    send = slotted_layout(
        destination_MA, queue_positions(destination_MA, Q, slot_major=False), Q, C
    )
    x_QCD = dispatch_rows(x_MD, send).reshape(Q, C, D)
    local_id_P = jnp.where(
        send.assignment_of_row_P < M * A,
        jnp.append(ids_MA.reshape(-1) % E_local, E_local)[send.assignment_of_row_P],
        E_local,  # empty slot: no expert
    )
    with jax.named_scope("expert_exchange"):
        x_received = jax.lax.all_to_all(x_QCD, "expert", 0, 0).reshape(Q * C, D)
        ids_received = jax.lax.all_to_all(local_id_P.reshape(Q, C), "expert", 0, 0)
    y_received = dropless(
        x_received, ids_received.reshape(Q * C, 1), w1, v1, w2, act, plan.gmm, expected_rows=M * A
    ).reshape(Q, C, D)  # expected: as many assignments as this device sends
    with jax.named_scope("expert_exchange"):
        y_back_PD = jax.lax.all_to_all(y_received, "expert", 0, 0).reshape(Q * C, D)
    return combine(collect_rows(y_back_PD, send), weights_MA)
