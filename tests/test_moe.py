"""Router, dense expert dispatch and the load-balancing loss against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import Dbrx, DbrxConfig
from dbrx_jax.moe import (
    MoE,
    Routing,
    load_balancing_loss,
    moe_aux_loss,
    moe_stats,
    route,
    router_z_loss,
)
from dbrx_jax.moe.dispatch import experts

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


@pytest.mark.slow
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
    y, _ = experts(
        x.reshape(B * T, -1),
        jittered.router.expert_ids_BTA.reshape(B * T, -1),
        jittered.router.weights_BTA.reshape(B * T, -1),
        w1,
        v1,
        w2,
        act=jax.nn.silu,
        impl=moe.plan.dispatch_for(B * T * config.moe_top_k),  # what the layer runs
        gmm=moe.plan.gmm,
    )
    np.testing.assert_allclose(jittered.y_BTD, y.reshape(x.shape), rtol=1e-6)
    # No key, or eps 0 / None: no jitter.
    for eps in (0.0, None):
        calm = MoE(config.replace(moe_jitter_eps=eps), rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(calm(x, jitter_key=key).y_BTD, clean.y_BTD)


@pytest.mark.parametrize("impl", ["dense", "dropless", "capacity"])
def test_experts_equal_a_per_token_loop(impl):
    x = RNG.randn(B * T, D)
    w1, v1 = RNG.randn(E, D, F) / 4, RNG.randn(E, D, F) / 4
    w2 = RNG.randn(E, F, D) / 4
    routing = route(
        jnp.asarray(x[None], jnp.float32),
        jnp.asarray(RNG.randn(D, E), jnp.float32),
        top_k=3,
        normalize_p=1.0,
    )
    ids, weights = routing.expert_ids_BTA[0], routing.weights_BTA[0]
    y, dropped = experts(
        jnp.asarray(x, jnp.float32),
        ids,
        weights,
        *(jnp.asarray(a, jnp.float32) for a in (w1, v1, w2)),
        act=jax.nn.silu,
        impl=impl,
        gmm="blocked",
        capacity_factor=E / 3,
    )
    assert not dropped.any()
    expected = np.zeros_like(x)
    for t in range(B * T):
        for e, g in zip(np.asarray(ids[t]), np.asarray(weights[t]), strict=True):
            gate = x[t] @ w1[e]
            expected[t] += g * ((gate / (1 + np.exp(-gate)) * (x[t] @ v1[e])) @ w2[e])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def _stacked_routing(L, top_k, seed=0):
    rng = np.random.RandomState(seed)
    logits = rng.randn(L, B, T, E).astype(np.float32)
    ids = np.argsort(-logits, -1)[..., :top_k].astype(np.int32)
    return Routing(
        logits_LBTE=jnp.asarray(logits),
        expert_ids_LBTA=jnp.asarray(ids),
        weights_LBTA=jnp.ones(ids.shape, jnp.float32) / top_k,
        dropped_LBTA=jnp.zeros(ids.shape, bool),
    )


def test_load_balancing_loss_is_megablocks():
    L, k = 3, 2
    routing = _stacked_routing(L, k)
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False  # padding counts nowhere
    probs = _softmax(np.asarray(routing.logits_LBTE, np.float64))
    ids = np.asarray(routing.expert_ids_LBTA)
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
    routing = Routing(
        logits_LBTE=jnp.zeros((L, B, tokens, E)),
        expert_ids_LBTA=jnp.asarray(ids),
        weights_LBTA=jnp.full(ids.shape, 0.5),
        dropped_LBTA=jnp.zeros(ids.shape, bool),
    )
    assert float(load_balancing_loss(routing, E)) == pytest.approx(1.0, rel=1e-6)


def test_z_loss_stats_and_weighted_aux_loss():
    L, k = 2, 2
    routing = _stacked_routing(L, k, seed=3)
    dropped = np.zeros((L, B, T, k), bool)
    dropped[0, 0, :3, 1] = True  # 3 of layer 0's assignments were dropped
    routing = routing.replace(dropped_LBTA=jnp.asarray(dropped))
    mask = np.ones((B, T), bool)
    mask[0, 0] = False  # ... one of them on a padding token, which counts nowhere
    logits = np.asarray(routing.logits_LBTE, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(router_z_loss(routing, jnp.asarray(mask))) == pytest.approx(
        np.mean([(lse[layer][mask] ** 2).mean() for layer in range(L)]), rel=1e-5
    )

    stats = moe_stats(routing, E, jnp.asarray(mask))
    ids = np.asarray(routing.expert_ids_LBTA)
    for layer in range(L):
        counts = np.bincount(ids[layer][mask].ravel(), minlength=E)
        np.testing.assert_array_equal(stats.tokens_per_expert_LE[layer], counts)
        assert float(stats.max_over_mean_load_L[layer]) == pytest.approx(
            counts.max() / counts.mean()
        )
        p = _softmax(logits[layer])
        entropy = -(p * np.log(p)).sum(-1)[mask].mean()
        assert float(stats.router_entropy_L[layer]) == pytest.approx(entropy, rel=1e-5)
    np.testing.assert_allclose(stats.dropped_fraction_L, [2 / (mask.sum() * k), 0.0], rtol=1e-6)

    config = DbrxConfig.preset(
        "dbrx-tiny", moe_num_experts=E, moe_top_k=k, moe_loss_weight=0.05, moe_z_loss_weight=1e-3
    )
    lb = float(load_balancing_loss(routing, E, jnp.asarray(mask)))
    z = float(router_z_loss(routing, jnp.asarray(mask)))
    assert float(moe_aux_loss(routing, config, jnp.asarray(mask))) == pytest.approx(
        0.05 * lb + 1e-3 * z, rel=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["dropless", "capacity"])
def test_model_level_impls_equal_dense(impl):
    config = DbrxConfig.preset("dbrx-tiny", moe_capacity_factor=4.0)  # E / k: nothing dropped
    tokens = jnp.asarray(RNG.randint(0, config.vocab_size, (2, 10)), jnp.int32)
    dense = Dbrx(config.replace(moe_impl="dense"), rngs=nnx.Rngs(0))(tokens)
    other = Dbrx(config.replace(moe_impl=impl), rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(other.logits, dense.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(other.router.expert_ids_LBTA, dense.router.expert_ids_LBTA)
    assert not other.router.dropped_LBTA.any()
    # At capacity factor 0.5 the capacity path must drop, and says so.
    tight = Dbrx(config.replace(moe_impl="capacity", moe_capacity_factor=0.5), rngs=nnx.Rngs(0))
    stats = moe_stats(tight(tokens).router, config.moe_num_experts)
    assert float(stats.dropped_fraction_L.max()) > 0
