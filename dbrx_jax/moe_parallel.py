"""Expert parallelism: the dropless MoE under `jax.shard_map` over the whole mesh.

Each device holds E / n_expert of every layer's experts (sharded over `expert`, their hidden dim
over `tensor`; the `fsdp` shards of D are gathered on the way in, as for any FSDP weight). Its
tokens are its own batch shard (split over data, fsdp and expert), already routed. Two ways for
tokens to reach their experts and come back, over the `expert` axis only (`moe_exchange`):

  all_gather  gather every token of the expert group, run the local experts on the assignments
              that chose them, and `psum_scatter` the partial outputs back to their owners.
              Sends each token once whatever top_k is: the better choice for DBRX's top-4.
  all_to_all  send each device exactly the rows of its experts (at most min(top_k, local
              experts) rows per token) in fixed-size buffers, run them, send the outputs back.

Expert weights are never gathered over `expert`. The `tensor` partial sums meet in one psum.
Shape legend as moe_dispatch.py; n the size of the `expert` axis, S slots per destination.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dbrx_jax import moe_dispatch
from dbrx_jax.config import MOE_EXCHANGES
from dbrx_jax.moe_dispatch import (
    collect_rows,
    combine,
    dispatch_rows,
    dropless,
    queue_positions,
    slotted_layout,
)
from dbrx_jax.sharding import BATCH_AXES


def sharded_experts(
    x_BTD: jax.Array,
    expert_ids_BTA: jax.Array,
    weights_BTA: jax.Array,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array,
    w2_EFD: jax.Array,
    *,
    act: Callable[[jax.Array], jax.Array],
    gmm_impl: str,
    exchange: str,
    fuse_gate_up: bool = False,
) -> jax.Array:
    """`moe_dispatch.experts(impl="dropless")` for a batch and experts sharded over the active
    mesh (`jax.set_mesh`). Returns y_BTD, sharded like x_BTD. `fuse_gate_up` concatenates each
    device's own blocks of w1 and v1 (both split over F by `tensor`) for one GEMM."""
    if exchange not in MOE_EXCHANGES:
        raise ValueError(f"moe_exchange {exchange!r}: expected one of {MOE_EXCHANGES}")
    mesh = jax.sharding.get_abstract_mesh()
    batch_shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    # Too few rows to split over the batch axes (decoding one sequence, say): every device
    # holds all the tokens, runs its local experts on them, and the partial outputs are summed.
    replicated = x_BTD.shape[0] % batch_shards != 0
    batch = P() if replicated else P(BATCH_AXES)
    w13 = P("expert", None, "tensor")
    w2 = P("expert", "tensor", None)

    def local(x_BTD, ids_BTA, weights_BTA, w1, v1, w2):
        B, T, D = x_BTD.shape
        if fuse_gate_up:
            w1, v1 = moe_dispatch.fuse_gate_up(w1, v1), None
        args = (
            x_BTD.reshape(B * T, D),
            ids_BTA.reshape(B * T, -1),
            weights_BTA.reshape(B * T, -1),
            w1,
            v1,
            w2,
            act,
            gmm_impl,
        )
        if replicated:
            y_TD = jax.lax.psum(_local_only(*args), ("expert", "tensor"))
        else:
            y_TD = _all_gather(*args) if exchange == "all_gather" else _all_to_all(*args)
            y_TD = jax.lax.psum(y_TD, "tensor")
        return y_TD.astype(x_BTD.dtype).reshape(B, T, D)

    return jax.shard_map(
        local,
        in_specs=(batch, batch, batch, w13, w13, w2),
        out_specs=batch,
        check_vma=False,
    )(x_BTD, expert_ids_BTA, weights_BTA, w1_EDF, v1_EDF, w2_EFD)


def _local_experts(num_local: int) -> tuple[jax.Array, int]:
    return jax.lax.axis_index("expert") * num_local, jax.lax.axis_size("expert")


def _local_only(x_TD, ids_TA, weights_TA, w1, v1, w2, act, gmm_impl):
    """Every token's assignments to this device's experts (fp32 partial outputs)."""
    first, _ = _local_experts(w1.shape[0])
    y_TAD = dropless(
        x_TD,
        ids_TA - first,
        w1,
        v1,
        w2,
        act,
        gmm_impl,
        max_rows=ids_TA.shape[0] * min(ids_TA.shape[1], w1.shape[0]),
    )
    return combine(y_TAD, weights_TA)


def _all_gather(x_TD, ids_TA, weights_TA, w1, v1, w2, act, gmm_impl):
    """1. Gather the expert group's tokens, their choices and weights.
    2. Dropless over the assignments to this device's experts (the rest are left out).
    3. Combine into partial outputs for every gathered token (fp32) and reduce-scatter them
       back to the devices that own the tokens."""
    T, A = ids_TA.shape
    E_local = w1.shape[0]
    first, n = _local_experts(E_local)
    with jax.named_scope("expert_exchange"):
        x_nTD = jax.lax.all_gather(x_TD, "expert", tiled=True)
        ids_nTA = jax.lax.all_gather(ids_TA, "expert", tiled=True)
        weights_nTA = jax.lax.all_gather(weights_TA, "expert", tiled=True)
    local_ids = ids_nTA - first  # outside [0, E_local): another device's expert, left out
    max_rows = n * T * min(A, E_local)
    y_nTAD = dropless(x_nTD, local_ids, w1, v1, w2, act, gmm_impl, max_rows=max_rows)
    partial_nTD = combine(y_nTAD, weights_nTA)
    with jax.named_scope("expert_exchange"):
        return jax.lax.psum_scatter(partial_nTD, "expert", scatter_dimension=0, tiled=True)


def _all_to_all(x_TD, ids_TA, weights_TA, w1, v1, w2, act, gmm_impl):
    """1. Destination device of every assignment: its expert // E_local. Each destination gets
       S = T * min(A, E_local) slots (a token cannot send it more), filled in token order.
    2. all_to_all the slot rows and their local expert ids.
    3. Dropless over the received rows (empty slots left out).
    4. all_to_all the outputs back; each assignment reads its slot; combine (fp32)."""
    T, A = ids_TA.shape
    E_local, D = w1.shape[0], x_TD.shape[1]
    _, n = _local_experts(E_local)
    S = T * min(A, E_local)
    dest_TA = ids_TA // E_local
    send = slotted_layout(dest_TA, queue_positions(dest_TA, n, slot_major=False), n, S)
    x_nSD = dispatch_rows(x_TD, send).reshape(n, S, D)
    local_id_P = jnp.where(
        send.assignment_of_row_P < T * A,
        jnp.append(ids_TA.reshape(-1) % E_local, E_local)[send.assignment_of_row_P],
        E_local,  # empty slot: no expert
    )
    with jax.named_scope("expert_exchange"):
        x_recv = jax.lax.all_to_all(x_nSD, "expert", 0, 0).reshape(n * S, D)
        id_recv = jax.lax.all_to_all(local_id_P.reshape(n, S), "expert", 0, 0).reshape(n * S, 1)
    y_recv = dropless(x_recv, id_recv, w1, v1, w2, act, gmm_impl).reshape(n, S, D)
    with jax.named_scope("expert_exchange"):
        y_back = jax.lax.all_to_all(y_recv, "expert", 0, 0).reshape(n * S, D)
    return combine(collect_rows(y_back, send), weights_TA)
