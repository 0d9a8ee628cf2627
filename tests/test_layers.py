"""LayerNorm, RoPE and attention against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import DbrxConfig
from dbrx_jax.model.dbrx import positions_from_segments
from dbrx_jax.model.layers import (
    Attention,
    LayerCache,
    LayerNorm,
    apply_rope,
    attention_by_query_chunks,
    attention_mask,
    dot_product_attention,
    rope_tables,
)

RNG = np.random.RandomState(0)


def test_layer_norm_is_bias_free_eps_1e5_with_fp32_statistics():
    config = DbrxConfig.preset("dbrx-tiny", dtype="bfloat16")
    norm = LayerNorm(config)
    norm.scale[...] = jnp.asarray(RNG.uniform(0.5, 1.5, config.d_model), jnp.float32)
    x = RNG.randn(3, 5, config.d_model) * 3 + 2
    x[0, 0] = 7.0  # a constant row: zero variance, finite output
    x[0, 1] = RNG.randn(config.d_model) * 1e-3  # variance 1e-6, where eps matters
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    y = norm(x_bf16)
    assert y.dtype == jnp.bfloat16
    x32 = np.asarray(x_bf16, np.float64)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    expected = (x32 - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...])
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-2, atol=1e-2)
    assert np.all(np.asarray(y[0, 0], np.float32) == 0)
    with_eps_1e6 = (x32 - mean) / np.sqrt(var + 1e-6) * np.asarray(norm.scale[...])
    assert np.abs(np.asarray(y[0, 1], np.float64) - with_eps_1e6[0, 1]).max() > 0.1


def test_rope_tables_and_rotation_match_neox_definition():
    H, theta = 16, 500000.0
    positions = jnp.asarray([[0, 1, 2, 7], [3, 4, 0, 1]])
    cos, sin = rope_tables(positions, H, theta, jnp.float32)
    inv_freq = theta ** (-np.arange(0, H, 2) / H)
    angles = np.concatenate([np.asarray(positions)[..., None] * inv_freq] * 2, -1)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)
    x = RNG.randn(2, 4, 3, H).astype(np.float32)
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    expected = (
        x * np.cos(angles)[:, :, None] + np.concatenate([-x2, x1], -1) * np.sin(angles)[:, :, None]
    )
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), cos, sin), expected, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    H = 32
    q, k = jnp.asarray(RNG.randn(1, 1, 1, H)), jnp.asarray(RNG.randn(1, 1, 1, H))

    def score(m, n):
        cq, sq = rope_tables(jnp.asarray([[m]]), H, 10000.0, jnp.float32)
        ck, sk = rope_tables(jnp.asarray([[n]]), H, 10000.0, jnp.float32)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-2)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("segmented", [False, True])
def test_xla_attention_equals_the_reference(kv_heads, segmented):
    B, T, N, H = 2, 11, 4, 8
    q = jnp.asarray(RNG.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(RNG.randn(B, T, kv_heads, H), jnp.float32)
    v = jnp.asarray(RNG.randn(B, T, kv_heads, H), jnp.float32)
    segments = jnp.asarray([[1] * 4 + [2] * 7, [0] * 3 + [1] * 8]) if segmented else None
    mask = attention_mask(segments)
    xla = dot_product_attention(q, k, v, mask, impl="xla")
    ref = dot_product_attention(q, k, v, mask, impl="reference")
    np.testing.assert_allclose(xla, ref, atol=1e-5)
    # GQA: query head n reads kv head n // (N / K).
    expanded = dot_product_attention(
        q, jnp.repeat(k, N // kv_heads, 2), jnp.repeat(v, N // kv_heads, 2), mask, impl="reference"
    )
    np.testing.assert_allclose(ref, expanded, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
@pytest.mark.parametrize("segmented", [False, True])
def test_cudnn_attention_equals_the_reference(segmented):
    """The GPU fast path (`attention_impl="cudnn"`), values and gradients, in bf16."""
    B, T, N, K, H = 2, 256, 8, 2, 64
    q = jnp.asarray(RNG.randn(B, T, N, H), jnp.bfloat16)
    k, v = (jnp.asarray(RNG.randn(B, T, K, H), jnp.bfloat16) for _ in range(2))
    segments = jnp.asarray([[1] * 100 + [2] * 156, [1] * 256]) if segmented else None
    mask = attention_mask(segments)
    cotangent = jnp.asarray(RNG.randn(B, T, N, H), jnp.bfloat16)

    def value_and_grads(impl):
        out, vjp = jax.vjp(lambda *a: dot_product_attention(*a, mask, impl=impl), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(cotangent))]

    for got, want in zip(value_and_grads("cudnn"), value_and_grads("reference"), strict=True):
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


@pytest.mark.slow  # Pallas interpreter on CPU
def test_splash_attention_equals_the_reference():
    """The TPU kernel (`attention_impl="splash"`, here in Pallas' interpreter): packed segments,
    left padding as segment 0, rows not a multiple of its blocks; values and gradients."""
    B, T, N, K, H = 2, 200, 4, 2, 16
    q = jnp.asarray(RNG.randn(B, T, N, H), jnp.float32)
    k, v = (jnp.asarray(RNG.randn(B, T, K, H), jnp.float32) for _ in range(2))
    segments = jnp.asarray([[1] * 70 + [2] * 130, [0] * 30 + [1] * 170])
    cotangent = jnp.asarray(RNG.randn(B, T, N, H), jnp.float32)

    def value_and_grads(impl):
        if impl == "splash":
            mask, kwargs = None, dict(segment_ids_BT=segments, interpret=True)
        else:
            mask, kwargs = attention_mask(segments), {}
        out, vjp = jax.vjp(lambda *a: dot_product_attention(*a, mask, impl=impl, **kwargs), q, k, v)
        return [np.asarray(x) for x in (out, *vjp(cotangent))]

    for got, want in zip(value_and_grads("splash"), value_and_grads("reference"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="pass segment_ids_BT, not a mask"):
        dot_product_attention(q, k, v, attention_mask(segments), impl="splash")


def test_cache_attention_by_query_chunks_equals_all_at_once():
    """The KV-cache path of a splash model (TPU) takes long prefills in chunks of queries."""
    B, T, S, N, K, H = 2, 12, 16, 4, 2, 8
    q = jnp.asarray(RNG.randn(B, T, N, H), jnp.float32)
    k, v = (jnp.asarray(RNG.randn(B, S, K, H), jnp.float32) for _ in range(2))
    mask = jnp.asarray(RNG.rand(B, 1, T, S) < 0.6).at[..., 0].set(True)
    whole = dot_product_attention(q, k, v, mask, impl="xla", causal=False)
    chunked = attention_by_query_chunks(q, k, v, mask, impl="xla", chunk=4)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)


def test_attention_is_causal_and_respects_segments():
    B, T, N, H = 1, 6, 2, 4
    q, k, v = (jnp.asarray(RNG.randn(B, T, N, H), jnp.float32) for _ in range(3))
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2]])
    out = dot_product_attention(q, k, v, attention_mask(segments), impl="reference")
    # The second segment alone gives the same result as inside the packed row.
    alone = dot_product_attention(q[:, 3:], k[:, 3:], v[:, 3:], None, impl="reference")
    np.testing.assert_allclose(out[:, 3:], alone, atol=1e-6)
    # The first query sees only the first key.
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-6)


def test_positions_restart_at_each_segment():
    segments = jnp.asarray([[1, 1, 2, 2, 2, 3], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        positions_from_segments(segments), [[0, 1, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3]]
    )


def test_attention_projection_shapes():
    config = DbrxConfig.preset("dbrx-tiny")
    attn = Attention(config, rngs=nnx.Rngs(0))
    K, G, H = config.kv_n_heads, config.n_kv_groups, config.head_dim
    assert attn.wqkv.shape == (config.d_model, K, G + 2, H)
    x = jnp.ones((2, 5, config.d_model))
    cos, sin = rope_tables(jnp.zeros((2, 5), jnp.int32), H, config.rope_theta, jnp.float32)
    out, cache = attn(x, cos, sin, None)
    assert out.shape == x.shape and cache is None
    assert jax.tree.leaves(nnx.state(attn))


def test_attention_with_a_cache_equals_attention_without():
    """The one attention: tokens written into an empty cache's first slots and attending over
    it (causally, by the explicit mask) give what attending to each other gives."""
    config = DbrxConfig.preset("dbrx-tiny", attention_impl="reference")
    attn = Attention(config, rngs=nnx.Rngs(0))
    B, T, S, K, H = 2, 5, 9, config.kv_n_heads, config.head_dim
    x = jnp.asarray(RNG.randn(B, T, config.d_model), jnp.float32)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), H, 1e4, jnp.float32)
    plain, _ = attn(x, cos, sin, None)
    empty = LayerCache(jnp.zeros((B, S, K, H)), jnp.zeros((B, S, K, H)), jnp.asarray(0))
    mask = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(T)[:, None], (B, 1, T, S))
    cached, cache = attn(x, cos, sin, mask, empty)
    np.testing.assert_allclose(cached, plain, atol=1e-6)
    assert not np.asarray(cache.k_BSKH[:, T:]).any() and np.asarray(cache.k_BSKH[:, :T]).any()
