"""Router, dense expert dispatch and the load-balancing loss against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import DbrxConfig
from dbrx_jax.moe import MoE, RouterOutput, dense_experts, load_balancing_loss, route

RNG = np.random.RandomState(0)
B, T, D, E, F = 2, 7, 16, 8, 12


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("p", [1.0, 2.0, None])
def test_route_softmax_topk_and_renormalisation(p):
    x = jnp.asarray(RNG.randn(B, T, D), jnp.float32)
    w = jnp.asarray(RNG.randn(D, E), jnp.float32)
    routing = route(x, w, top_k=3, normalize_p=p)
    probs = _softmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
    top = np.argsort(-probs, -1)[..., :3]
    np.testing.assert_array_equal(routing.expert_ids_BTA, top)
    chosen = np.take_along_axis(probs, top, -1)
    if p is not None:
        chosen = chosen / (np.abs(chosen) ** p).sum(-1, keepdims=True) ** (1 / p)
    np.testing.assert_allclose(routing.weights_BTA, chosen, rtol=1e-5)
    np.testing.assert_allclose(routing.probs_BTE, probs, rtol=1e-5)
    assert routing.logits_BTE.dtype == jnp.float32


def test_router_runs_in_fp32_for_bf16_inputs():
    x = jnp.asarray(RNG.randn(B, T, D), jnp.bfloat16)
    routing = route(x, jnp.asarray(RNG.randn(D, E), jnp.float32), top_k=2, normalize_p=1.0)
    assert routing.logits_BTE.dtype == routing.weights_BTA.dtype == jnp.float32
    np.testing.assert_allclose(routing.weights_BTA.sum(-1), 1.0, rtol=1e-6)


def test_jitter_scales_only_the_router_input():
    config = DbrxConfig.preset("dbrx-tiny", moe_jitter_eps=0.5)
    moe = MoE(config, rngs=nnx.Rngs(0))
    x = jnp.asarray(RNG.randn(B, T, config.d_model), jnp.float32)
    key = jax.random.key(1)
    jittered = moe(x, jitter_key=key)
    clean = moe(x)
    assert not np.allclose(jittered.router.logits_BTE, clean.router.logits_BTE)
    # The router saw x * U(0.5, 1.5) ...
    noise = jax.random.uniform(key, x.shape, jnp.float32, 0.5, 1.5)
    expected = route(x * noise, moe.router[...], top_k=config.moe_top_k, normalize_p=1.0)
    np.testing.assert_allclose(jittered.router.logits_BTE, expected.logits_BTE, rtol=1e-6)
    # ... while the experts computed on the clean x.
    w1, v1, w2 = moe.w1[...], moe.v1[...], moe.w2[...]
    y = dense_experts(x, jittered.router, w1, v1, w2, jax.nn.silu)
    np.testing.assert_allclose(jittered.y_BTD, y, rtol=1e-6)
    # No key, or eps 0 / None: no jitter.
    for eps in (0.0, None):
        calm = MoE(config.replace(moe_jitter_eps=eps), rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(calm(x, jitter_key=key).y_BTD, clean.y_BTD)


def test_dense_experts_equal_a_per_token_loop():
    x = RNG.randn(B, T, D)
    w1, v1 = RNG.randn(E, D, F) / 4, RNG.randn(E, D, F) / 4
    w2 = RNG.randn(E, F, D) / 4
    routing = route(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(RNG.randn(D, E), jnp.float32),
        top_k=3,
        normalize_p=1.0,
    )
    y = dense_experts(
        *(jnp.asarray(a, jnp.float32) for a in (x,)),
        routing,
        *(jnp.asarray(a, jnp.float32) for a in (w1, v1, w2)),
        jax.nn.silu,
    )
    ids, weights = np.asarray(routing.expert_ids_BTA), np.asarray(routing.weights_BTA)
    expected = np.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for e, g in zip(ids[b, t], weights[b, t], strict=True):
                gate = x[b, t] @ w1[e]
                expected[b, t] += g * ((gate / (1 + np.exp(-gate)) * (x[b, t] @ v1[e])) @ w2[e])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def _stacked_routing(L, top_k, seed=0):
    rng = np.random.RandomState(seed)
    logits = rng.randn(L, B, T, E).astype(np.float32)
    ids = np.argsort(-logits, -1)[..., :top_k].astype(np.int32)
    return RouterOutput(
        logits_BTE=jnp.asarray(logits),
        expert_ids_BTA=jnp.asarray(ids),
        weights_BTA=jnp.ones(ids.shape, jnp.float32) / top_k,
    )


def test_load_balancing_loss_is_megablocks():
    L, k = 3, 2
    routing = _stacked_routing(L, k)
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False  # padding counts nowhere
    probs = _softmax(np.asarray(routing.logits_BTE, np.float64))
    ids = np.asarray(routing.expert_ids_BTA)
    n = mask.sum()
    total = 0.0
    for layer in range(L):
        counts = np.bincount(ids[layer][mask].ravel(), minlength=E)
        mean_probs = probs[layer][mask].mean(0)
        total += (counts * mean_probs).sum()
    expected = E / (L * n * k) * total
    got = load_balancing_loss(routing, E, jnp.asarray(mask))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_load_balancing_loss_is_one_when_perfectly_balanced():
    # Uniform probabilities and every expert chosen equally often.
    L, k, tokens = 2, 2, 8
    ids = np.stack([np.arange(B * tokens * k).reshape(B, tokens, k) % E] * L).astype(np.int32)
    routing = RouterOutput(
        logits_BTE=jnp.zeros((L, B, tokens, E)),
        expert_ids_BTA=jnp.asarray(ids),
        weights_BTA=jnp.full(ids.shape, 0.5),
    )
    assert float(load_balancing_loss(routing, E)) == pytest.approx(1.0, rel=1e-6)
