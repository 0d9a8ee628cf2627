"""Causal GQA attention on TPU by JAX's splash attention kernel (Pallas, Mosaic): blockwise
online softmax, so no `[T, S]` score matrix exists in HBM, forward or backward; packed rows
are separated by segment ids, which the kernel compares block by block (no mask array either).

    1. Scale the queries by 1 / sqrt(H) (the kernel does not) and lay q, k, v out heads-major
       (`[B, N, T, H]`, `[B, K, T, H]`), rows padded to a whole number of blocks.
    2. Under `shard_map` over the model's mesh: each device runs the kernel on its batch rows
       (`vmap`) and heads (`tensor`, when it divides the KV heads), the mask built for its own
       number of heads. The kernel's GQA maps query head n to KV head n // G, as the model does.
    3. Back to `[B, T, N, H]`, padding rows dropped.

Padding rows at the end attend only to themselves and earlier rows (causal), and real rows
never see them. Segment id 0 (the model's padding) is one more segment: its rows attend to each
other, as with the mask of the XLA path, so no row is empty and no softmax divides by zero.
Off TPU the kernel runs in Pallas' interpreter (tests only: slow). Shape letters as in
dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dbrx_jax.sharding import BATCH_AXES

# Rows per block of queries and of keys, largest first (a multiple of 128, the lanes). 512 is
# what MaxText runs at DBRX-like head dims; smaller only when the sequence is short.
BLOCKS = (512, 256, 128)


def block_size(num_rows: int) -> int:
    """The block for a sequence of `num_rows` (already a multiple of 128)."""
    return next(b for b in BLOCKS if num_rows % b == 0)


def _splash():
    # The TPU Pallas kernels, imported only when this path runs (importing them loads libtpu).
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


def _kernel(num_heads: int, num_rows: int, interpret: bool):
    """A causal splash kernel for `num_heads` query heads over `num_rows` rows, the same
    block size in the forward and both backward kernels."""
    splash = _splash()
    block = block_size(num_rows)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((num_rows, num_rows))] * num_heads)
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array | None,
    *,
    mesh: Mesh | None,
    interpret: bool = False,
) -> jax.Array:
    """Causal GQA self-attention of T tokens (keys and values are the same tokens'), within
    segments when `segment_ids_BT` is given. Returns `[B, T, N, H]` in q's dtype; the softmax
    is in fp32 inside the kernel."""
    B, T, _, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    padded = -(-T // 128) * 128
    q_BTNH = q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)  # the kernel does not scale

    def heads_major(x_BTJH):
        x_BTJH = jnp.pad(x_BTJH, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
        return x_BTJH.transpose(0, 2, 1, 3)

    q_BNTH, k_BKTH, v_BKTH = map(heads_major, (q_BTNH, k_BTKH, v_BTKH))
    if segment_ids_BT is not None:
        # Padding rows get the last row's segment: causal already keeps them from real rows.
        segment_ids_BT = jnp.pad(
            segment_ids_BT.astype(jnp.int32), ((0, 0), (0, padded - T)), mode="edge"
        )

    def local(q_BNTH, k_BKTH, v_BKTH, *segment_ids):
        kernel = _kernel(q_BNTH.shape[1], padded, interpret)
        if not segment_ids:
            return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)

        def row(q_NTH, k_KTH, v_KTH, segment_ids_T):
            ids = _splash().SegmentIds(segment_ids_T, segment_ids_T)
            return kernel(q_NTH, k_KTH, v_KTH, segment_ids=ids)

        return jax.vmap(row)(q_BNTH, k_BKTH, v_BKTH, *segment_ids)

    args = (q_BNTH, k_BKTH, v_BKTH) + (() if segment_ids_BT is None else (segment_ids_BT,))
    if mesh is None:
        out_BNTH = local(*args)
    else:
        sizes = dict(mesh.shape)
        batch = BATCH_AXES if B % math.prod(sizes[a] for a in BATCH_AXES) == 0 else None
        heads = "tensor" if K % sizes["tensor"] == 0 else None
        specs = (P(batch, heads),) * 3 + (P(batch),) * (len(args) - 3)
        out_BNTH = jax.shard_map(
            local, mesh=mesh, in_specs=specs, out_specs=P(batch, heads), check_vma=False
        )(*args)
    return out_BNTH.transpose(0, 2, 1, 3)[:, :T]
