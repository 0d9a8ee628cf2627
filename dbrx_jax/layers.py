"""The non-MoE pieces of a DBRX block: bias-free LayerNorm, NeoX RoPE, and GQA attention.

Shape legend (shared with moe.py and model.py): B batch, T query tokens, S key tokens, D d_model,
N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, J the K-major slots
of the fused QKV projection (G queries, then one key, then one value: J = G + 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dbrx_jax.config import DbrxConfig

# The tensors the "matmuls" remat policy keeps (model.CHECKPOINT_POLICIES): each matmul's result,
# tagged with `checkpoint_name` where it is computed (here and in moe_dispatch.glu).
SAVED_BY_MATMULS_POLICY = ("qkv", "attention", "attention_out", "expert_gate_up", "expert_down")


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    logical_axes: tuple[str, ...],
    config: DbrxConfig,
    *,
    std: float | None = None,
) -> nnx.Param:
    """A parameter with its logical axis names (mapped to mesh axes by the sharding rules).

    `std=None` means ones (norm scales); otherwise normal(0, std) as the reference initialises
    every matrix (`initializer_range`)."""
    assert len(shape) == len(logical_axes), (shape, logical_axes)
    dtype = config.weight_dtype
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=logical_axes)


def at_least_fp32(dtype) -> jnp.dtype:
    """float32 for 16- and 32-bit inputs, float64 stays float64 (for the exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm without bias: mean-centred, biased variance, eps 1e-5, statistics in fp32.

    (Flax's own LayerNorm defaults to eps 1e-6 and a one-pass variance; DBRX's reference uses
    torch.nn.LayerNorm.)"""

    def __init__(self, config: DbrxConfig, *, eps: float = 1e-5):
        self.scale = param(None, (config.d_model,), ("embed",), config)
        self.eps = eps
        self.dtype = config.compute_dtype

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(at_least_fp32(x_BTD.dtype))  # fp32 statistics, as the reference
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(x.dtype)
        return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding, GPT-NeoX style (rotate_half over all H dims, not interleaved).


def rope_tables(
    positions_BT: jax.Array, head_dim: int, theta: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables `[B, T, H]` for the given (per-token) positions.

    As the reference, the inverse frequencies and angles are computed in fp32 whatever the model
    dtype and only the tables are cast down. A float64 model computes them in float64.
    """
    table_dtype = at_least_fp32(dtype)
    inv_freq_h = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=table_dtype) / head_dim))
    angles_BTh = positions_BT.astype(table_dtype)[..., None] * inv_freq_h
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    return jnp.cos(angles_BTH).astype(dtype), jnp.sin(angles_BTH).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    rotated_BTNH = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated_BTNH * sin_BTH[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Attention.


def attention_mask(
    segment_ids_BT: jax.Array | None,
    kv_segment_ids_BS: jax.Array | None = None,
) -> jax.Array | None:
    """`[B, 1, T, S]` True where a query may attend a key within the same segment (the causal
    part is applied separately). None when there are no segments (one sequence per row)."""
    if segment_ids_BT is None:
        return None
    kv = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    return (segment_ids_BT[:, :, None] == kv[:, None, :])[:, None, :, :]


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_B1TS: jax.Array | None,
    *,
    impl: str,
    causal: bool = True,
) -> jax.Array:
    """GQA attention. `impl`: 'xla' or 'cudnn' (`jax.nn.dot_product_attention`, which does the
    softmax in fp32), or 'reference' (plain einsums; softmax in fp32, or float64 for float64
    inputs, which JAX's own always casts to fp32). `causal=False` leaves all masking to
    `mask_B1TS` (the KV-cache path, where queries sit at arbitrary cache slots)."""
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=causal, implementation=impl
        )
    if impl != "reference":
        raise ValueError(f"attention impl {impl!r}: expected 'xla', 'cudnn' or 'reference'")
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=at_least_fp32(q_BTNH.dtype)
    )
    logits_BKGTS = logits_BKGTS * np.asarray(H**-0.5, logits_BKGTS.dtype)
    allowed = jnp.ones((T, S), bool)
    if causal:
        allowed = jnp.tril(allowed, k=S - T)  # queries at the end
    if mask_B1TS is not None:
        allowed = allowed & mask_B1TS
    allowed_B11TS = jnp.broadcast_to(allowed, (B, 1, T, S))[:, :, None]
    logits_BKGTS = jnp.where(allowed_B11TS, logits_BKGTS, jnp.finfo(logits_BKGTS.dtype).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)  # fp32 softmax
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


class Attention(nnx.Module):
    """Fused QKV projection with clipping, NeoX RoPE, GQA attention, output projection.

    `wqkv` is `[D, K, J, H]`: for every KV head its G query heads, then its key, then its value.
    Grouping by KV head keeps a tensor-parallel split over K local to each shard. (HF's `Wqkv` is
    `[(N + 2K) * H, D]` with all queries first; the converter reorders.)"""

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs):
        c = config
        std = c.initializer_range
        self.wqkv = param(
            rngs,
            (c.d_model, c.kv_n_heads, c.n_kv_groups + 2, c.head_dim),
            ("embed", "kv_heads", "qkv", "head_dim"),
            c,
            std=std,
        )
        self.out = param(
            rngs, (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), c, std=std
        )
        self.clip_qkv = c.clip_qkv
        self.impl = c.attention_impl
        self.dtype = c.compute_dtype

    def project(
        self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values: fused projection, clipping, RoPE on q and k."""
        B, T, _ = x_BTD.shape
        _, K, J, H = self.wqkv.shape
        G = J - 2
        qkv_BTKJH = jnp.einsum("BTD,DKJH->BTKJH", x_BTD, self.wqkv[...].astype(self.dtype))
        qkv_BTKJH = checkpoint_name(qkv_BTKJH, "qkv")
        if self.clip_qkv is not None:
            # Clip the whole fused output, Q, K and V alike, before RoPE, as the reference.
            qkv_BTKJH = jnp.clip(qkv_BTKJH, -self.clip_qkv, self.clip_qkv)
        q_BTNH = qkv_BTKJH[:, :, :, :G].reshape(B, T, K * G, H)
        k_BTKH = qkv_BTKJH[:, :, :, G]
        v_BTKH = qkv_BTKJH[:, :, :, G + 1]
        return apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH), v_BTKH

    def _output(self, out_BTNH: jax.Array) -> jax.Array:
        out_BTNH = checkpoint_name(out_BTNH, "attention")
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.out[...].astype(self.dtype))
        return checkpoint_name(out_BTD, "attention_out")

    def __call__(
        self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array, mask_B1TS: jax.Array | None
    ) -> jax.Array:
        with jax.named_scope("attention"):  # profiling.py attributes the step's time by scope
            q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, cos_BTH, sin_BTH)
            out_BTNH = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, impl=self.impl)
            return self._output(out_BTNH)

    def cached(
        self,
        x_BTD: jax.Array,
        cos_BTH: jax.Array,
        sin_BTH: jax.Array,
        mask_B1TS: jax.Array,
        k_cache_BSKH: jax.Array,
        v_cache_BSKH: jax.Array,
        start: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention for T new tokens at cache slots [start, start + T): their keys (after RoPE)
        and values (after clipping) go into the cache, and they attend over it as `mask_B1TS`
        allows. Returns the output and the updated caches."""
        q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, cos_BTH, sin_BTH)
        k_cache_BSKH = jax.lax.dynamic_update_slice_in_dim(
            k_cache_BSKH, k_BTKH.astype(k_cache_BSKH.dtype), start, axis=1
        )
        v_cache_BSKH = jax.lax.dynamic_update_slice_in_dim(
            v_cache_BSKH, v_BTKH.astype(v_cache_BSKH.dtype), start, axis=1
        )
        out_BTNH = dot_product_attention(
            q_BTNH, k_cache_BSKH, v_cache_BSKH, mask_B1TS, impl=self.impl, causal=False
        )
        return self._output(out_BTNH), k_cache_BSKH, v_cache_BSKH
