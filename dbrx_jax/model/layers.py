"""The non-MoE pieces of a DBRX block: bias-free LayerNorm, NeoX RoPE, and GQA attention with
an optional KV cache. Shape letters as in dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from dbrx_jax import lora
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model.splash import splash_attention
from dbrx_jax.moe.plan import platform_of
from dbrx_jax.nn import at_least_fp32, param, saved_for_backward
from dbrx_jax.quant import dense

# The KV-cache path of a model whose attention is splash (TPU): queries in chunks of this many,
# so a long prefill holds [chunk, S] scores at a time, not [T, S].
CACHE_QUERY_CHUNK = 512


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
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=table_dtype) / head_dim))  # [H/2]
    half_angles = positions_BT.astype(table_dtype)[..., None] * inv_freq  # [B, T, H/2]
    angles_BTH = jnp.concatenate([half_angles, half_angles], axis=-1)
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
    """`[B, 1, T, S]` True where a query may attend a key of the same segment (the causal part
    is applied separately). None when there are no segments (one sequence per row). Keys are the
    queries' own tokens unless `kv_segment_ids_BS` (a KV cache's) is given."""
    if segment_ids_BT is None:
        return None
    kv = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    return (segment_ids_BT[:, :, None] == kv[:, None, :])[:, None, :, :]


def attention_impl_for(name: str, platform: str) -> str:
    """The attention `DbrxConfig.attention_impl` stands for on `platform`'s devices: "auto" is
    splash on TPU (no [T, S] scores in HBM: `splash_attention`) and xla elsewhere (CPU and GPU
    as before "auto" existed). Splash is causal self-attention without a cache; the KV-cache
    path of a splash model runs xla, in query chunks (`Attention`)."""
    if name == "auto":
        return "splash" if platform == "tpu" else "xla"
    return name


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_B1TS: jax.Array | None,
    *,
    impl: str,
    causal: bool = True,
    segment_ids_BT: jax.Array | None = None,
    mesh: Mesh | None = None,
    interpret: bool = False,
) -> jax.Array:
    """GQA attention. `impl`: 'xla' or 'cudnn' (`jax.nn.dot_product_attention`, which does the
    softmax in fp32), 'splash' (the TPU kernel, model/splash.py: causal self-attention within
    `segment_ids_BT`, no mask; under `shard_map` over `mesh`; `interpret` off TPU), or
    'reference' (plain einsums; softmax in fp32, or float64 for float64 inputs, which JAX's own
    always casts to fp32). `causal=False` leaves all masking to `mask_B1TS` (the KV-cache path,
    where queries sit at arbitrary cache slots). G query heads share each of the K key/value
    heads."""
    if impl == "splash":
        if mask_B1TS is not None or not causal:
            raise ValueError(
                "splash attention is causal self-attention within segment ids: pass "
                "segment_ids_BT, not a mask (the KV-cache path runs 'xla')"
            )
        return splash_attention(
            q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, mesh=mesh, interpret=interpret
        )
    if segment_ids_BT is not None:
        raise ValueError(f"attention impl {impl!r} takes a mask, not segment ids")
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=causal, implementation=impl
        )
    if impl != "reference":
        raise ValueError(
            f"attention impl {impl!r}: expected 'xla', 'cudnn', 'splash' or 'reference' "
            "('auto' is resolved by attention_impl_for)"
        )
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


def attention_by_query_chunks(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask_B1TS: jax.Array,
    *,
    impl: str,
    chunk: int,
) -> jax.Array:
    """`dot_product_attention(..., causal=False)` one chunk of `chunk` queries at a time (a
    `lax.map`), so the scores held at once are `[B, N, chunk, S]`; T must be a multiple."""
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    num = T // chunk
    q_chunks = q_BTNH.reshape(B, num, chunk, N, H).swapaxes(0, 1)
    mask_chunks = jnp.broadcast_to(mask_B1TS, (B, 1, T, S)).reshape(B, 1, num, chunk, S)
    mask_chunks = mask_chunks.transpose(2, 0, 1, 3, 4)

    def one(chunk_inputs):
        q_BtNH, mask_B1tS = chunk_inputs
        return dot_product_attention(q_BtNH, k_BSKH, v_BSKH, mask_B1tS, impl=impl, causal=False)

    out_chunks = jax.lax.map(one, (q_chunks, mask_chunks))
    return out_chunks.swapaxes(0, 1).reshape(B, T, N, H)


@struct.dataclass
class LayerCache:
    """One layer's KV cache: keys (after RoPE) and values (after clipping) for S slots, and the
    slot where the next tokens go (the same for every row)."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    start: jax.Array


class Attention(nnx.Module):
    """Fused QKV projection with clipping, NeoX RoPE, GQA attention, output projection.

    `wqkv` is `[D, K, J, H]`: for every KV head its G query heads, then its key, then its value.
    Grouping by KV head keeps a tensor-parallel split over K local to each shard. (HF's `Wqkv` is
    `[(N + 2K) * H, D]` with all queries first; io/hf_format.py reorders.)

    `mesh`: the mesh the model runs on (None: one device); its devices' platform (the default
    device's without one) resolves `attention_impl` once, here (`attention_impl_for`)."""

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
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
        adapted = lora.targets(c)
        self.wqkv_lora = nnx.data(self._adapter(c, "attn.wqkv", self.wqkv, adapted, rngs))
        self.out_lora = nnx.data(self._adapter(c, "attn.out", self.out, adapted, rngs))
        self.clip_qkv = c.clip_qkv
        platform = platform_of(mesh)
        self.impl = attention_impl_for(c.attention_impl, platform)
        # Splash has no KV-cache form: the cache path takes the mask, by XLA, in query chunks.
        self.cache_impl = "xla" if self.impl == "splash" else self.impl
        self.interpret = self.impl == "splash" and platform != "tpu"
        self.mesh = mesh
        self.dtype = c.compute_dtype

    def __call__(
        self,
        x_BTD: jax.Array,
        cos_BTH: jax.Array,
        sin_BTH: jax.Array,
        mask_B1TS: jax.Array | None,
        cache: LayerCache | None = None,
        segment_ids_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attention of T tokens. Without a cache they attend causally to each other (within
        `mask_B1TS`, or with splash within `segment_ids_BT`). With one, their keys and values go
        into slots [start, start + T) and they attend over the whole cache as `mask_B1TS`
        (`[B, 1, T, S]`) allows; the updated cache comes back."""
        with jax.named_scope("attention"):  # benchmarks/profiling.py attributes time by scope
            q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, cos_BTH, sin_BTH)
            if cache is None:
                out_BTNH = dot_product_attention(
                    q_BTNH,
                    k_BTKH,
                    v_BTKH,
                    mask_B1TS,
                    impl=self.impl,
                    causal=True,
                    segment_ids_BT=segment_ids_BT,
                    mesh=self.mesh,
                    interpret=self.interpret,
                )
            else:
                cache = cache.replace(
                    k_BSKH=jax.lax.dynamic_update_slice_in_dim(
                        cache.k_BSKH, k_BTKH.astype(cache.k_BSKH.dtype), cache.start, axis=1
                    ),
                    v_BSKH=jax.lax.dynamic_update_slice_in_dim(
                        cache.v_BSKH, v_BTKH.astype(cache.v_BSKH.dtype), cache.start, axis=1
                    ),
                )
                T = q_BTNH.shape[1]
                if self.impl == "splash" and T > CACHE_QUERY_CHUNK and T % CACHE_QUERY_CHUNK == 0:
                    out_BTNH = attention_by_query_chunks(
                        q_BTNH,
                        cache.k_BSKH,
                        cache.v_BSKH,
                        mask_B1TS,
                        impl=self.cache_impl,
                        chunk=CACHE_QUERY_CHUNK,
                    )
                else:
                    out_BTNH = dot_product_attention(
                        q_BTNH,
                        cache.k_BSKH,
                        cache.v_BSKH,
                        mask_B1TS,
                        impl=self.cache_impl,
                        causal=False,
                    )
            out_BTNH = saved_for_backward(out_BTNH, "attention")
            out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, dense(self.out.get_value(), self.dtype))
            if self.out_lora is not None:
                out_BTD += self.out_lora(out_BTNH, "BTNH,NHr->BTr", "BTr,rD->BTD")
            return saved_for_backward(out_BTD, "attention_out"), cache

    @staticmethod
    def _adapter(c, name, weight, adapted, rngs) -> lora.Adapter | None:
        if name not in adapted:
            return None
        return lora.Adapter(c, name, weight.shape, weight.get_metadata("logical_axes"), rngs=rngs)

    def project(
        self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values: fused projection, clipping, RoPE on q and k."""
        B, T, _ = x_BTD.shape
        _, K, J, H = self.wqkv.shape
        G = J - 2
        wqkv_DKJH = dense(self.wqkv.get_value(), self.dtype)
        qkv_BTKJH = jnp.einsum("BTD,DKJH->BTKJH", x_BTD, wqkv_DKJH)
        if self.wqkv_lora is not None:
            qkv_BTKJH += self.wqkv_lora(x_BTD, "BTD,Dr->BTr", "BTr,rKJH->BTKJH")
        qkv_BTKJH = saved_for_backward(qkv_BTKJH, "qkv")
        if self.clip_qkv is not None:
            # Clip the whole fused output, Q, K and V alike, before RoPE, as the reference.
            qkv_BTKJH = jnp.clip(qkv_BTKJH, -self.clip_qkv, self.clip_qkv)
        q_BTNH = qkv_BTKJH[:, :, :, :G].reshape(B, T, K * G, H)
        k_BTKH = qkv_BTKJH[:, :, :, G]
        v_BTKH = qkv_BTKJH[:, :, :, G + 1]
        return apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH), v_BTKH
