"""DBRX's mixture-of-experts FFN: the router, the GLU experts, and the losses and statistics of
the routing. How tokens reach their experts (dense / dropless / capacity) is moe_dispatch.py.

Shape legend: B batch, T tokens, D d_model, E experts, F expert hidden size, A the top_k active
slots of a token, L layers (the model stacks every layer's `RouterOutput`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dbrx_jax.config import DbrxConfig
from dbrx_jax.layers import at_least_fp32, param
from dbrx_jax.moe_dispatch import experts, fuse_gate_up, resolve_moe_impl
from dbrx_jax.moe_parallel import sharded_experts
from dbrx_jax.sharding import active_mesh

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@struct.dataclass
class RouterOutput:
    """What the router decided for each token (per layer; `[L, ...]` once stacked by the model).

    logits_BTE: router logits in fp32 (softmax them for the probabilities).
    expert_ids_BTA: the top_k experts chosen, by decreasing probability (int32).
    weights_BTA: their mixing weights after the p-norm renormalisation (fp32).
    dropped_BTA: assignments the capacity path dropped (always False for the exact paths).
    """

    logits_BTE: jax.Array
    expert_ids_BTA: jax.Array
    weights_BTA: jax.Array
    dropped_BTA: jax.Array

    @property
    def probs_BTE(self) -> jax.Array:
        return jax.nn.softmax(self.logits_BTE, axis=-1)


@struct.dataclass
class MoEOutput:
    y_BTD: jax.Array
    router: RouterOutput


def route(
    x_BTD: jax.Array,
    router_DE: jax.Array,
    *,
    top_k: int,
    normalize_p: float | None,
    jitter_eps: float | None = None,
    jitter_key: jax.Array | None = None,
) -> RouterOutput:
    """Chooses top_k experts per token.

    1. Jitter (training only, `jitter_key` given and eps > 0): scale the router's input by
       U(1 - eps, 1 + eps). Only the router sees it; the experts get the clean input.
    2. logits = x @ W_router, accumulated in fp32; probabilities = softmax in fp32 over all E.
    3. Take the top_k probabilities and renormalise them by their p-norm (p = 1: divide by their
       sum, i.e. a softmax over the chosen logits). `normalize_p=None` keeps the raw ones.
    """
    acc_dtype = at_least_fp32(x_BTD.dtype)
    if jitter_key is not None and jitter_eps:
        noise_BTD = jax.random.uniform(
            jitter_key, x_BTD.shape, acc_dtype, 1.0 - jitter_eps, 1.0 + jitter_eps
        )
        x_BTD = (x_BTD.astype(acc_dtype) * noise_BTD).astype(x_BTD.dtype)
    logits_BTE = jnp.einsum(
        "BTD,DE->BTE", x_BTD, router_DE.astype(x_BTD.dtype), preferred_element_type=acc_dtype
    )
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)  # fp32, as the reference
    weights_BTA, expert_ids_BTA = jax.lax.top_k(probs_BTE, top_k)
    if normalize_p is not None:
        norm_BT1 = jnp.sum(jnp.abs(weights_BTA) ** normalize_p, axis=-1, keepdims=True) ** (
            1.0 / normalize_p
        )
        weights_BTA = weights_BTA / norm_BT1
    return RouterOutput(
        logits_BTE=logits_BTE,
        expert_ids_BTA=expert_ids_BTA.astype(jnp.int32),
        weights_BTA=weights_BTA,
        dropped_BTA=jnp.zeros(expert_ids_BTA.shape, bool),
    )


class MoE(nnx.Module):
    """Router plus E GLU experts, stored as real `[E, D, F]` / `[E, F, D]` arrays.

    Under one of our meshes (`jax.set_mesh`) the dropless path runs expert-parallel
    (moe_parallel.py); dense and capacity are left to GSPMD."""

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs):
        c = config
        D, E, F = c.d_model, c.moe_num_experts, c.ffn_hidden_size
        std = c.initializer_range
        self.router = param(rngs, (D, E), ("embed", "expert_logits"), c, std=std)
        self.w1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.v1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.w2 = param(rngs, (E, F, D), ("expert", "mlp", "embed"), c, std=std)
        self.config = c

    def __call__(self, x_BTD: jax.Array, jitter_key: jax.Array | None = None) -> MoEOutput:
        c = self.config
        with jax.named_scope("router"):
            routing = route(
                x_BTD,
                self.router[...],
                top_k=c.moe_top_k,
                normalize_p=c.moe_normalize_expert_weights,
                jitter_eps=c.moe_jitter_eps,
                jitter_key=jitter_key,
            )
        B, T, D = x_BTD.shape
        w1, v1, w2 = (w[...].astype(c.compute_dtype) for w in (self.w1, self.v1, self.w2))
        act = ACTIVATIONS[c.ffn_act_fn]
        impl = resolve_moe_impl(c.moe_impl, routing.expert_ids_BTA.size)
        if active_mesh() is not None and impl in ("dropless", "gather"):
            y_BTD = sharded_experts(
                x_BTD,
                routing.expert_ids_BTA,
                routing.weights_BTA,
                w1,
                v1,
                w2,
                act=act,
                gmm_impl=c.gmm_impl,
                exchange=c.moe_exchange,
                fuse_gate_up=c.moe_fuse_gate_up,
            )
            return MoEOutput(y_BTD=y_BTD, router=routing)
        if c.moe_fuse_gate_up and impl in ("dropless", "capacity"):
            w1, v1 = fuse_gate_up(w1, v1), None
        y_ND, dropped_NA = experts(
            x_BTD.reshape(B * T, D),
            routing.expert_ids_BTA.reshape(B * T, -1),
            routing.weights_BTA.reshape(B * T, -1),
            w1,
            v1,
            w2,
            act=act,
            impl=impl,
            gmm_impl=c.gmm_impl,
            capacity_factor=c.capacity_factor,
        )
        routing = routing.replace(dropped_BTA=dropped_NA.reshape(B, T, -1))
        return MoEOutput(y_BTD=y_ND.reshape(B, T, D), router=routing)


# ---------------------------------------------------------------------------------------------
# Losses and statistics of the routing, from the stacked per-layer RouterOutput.


def _mask(router: RouterOutput, token_mask_BT: jax.Array | None) -> jax.Array:
    shape = router.logits_BTE.shape[1:3]
    return (
        jnp.ones(shape, jnp.float32) if token_mask_BT is None else token_mask_BT.astype(jnp.float32)
    )


def load_balancing_loss(
    router: RouterOutput, num_experts: int, token_mask_BT: jax.Array | None = None
) -> jax.Array:
    """MegaBlocks' load-balancing loss, the one DBRX was trained with (unweighted).

    With `router` stacked over layers (`[L, B, T, ...]`), T the number of real tokens and k the
    router's top_k:  E / (L * T * k) * sum_l sum_e c[l, e] * P[l, e],
    where c counts the (token, slot) assignments to expert e and P is the mean router probability
    of e. Padding tokens (`token_mask_BT` False) count in neither. Multiply by `moe_loss_weight`.
    (transformers computes a different, Mixtral-style loss; the two are not equal.)
    """
    L, _, _, top_k = router.expert_ids_BTA.shape
    mask_BT = _mask(router, token_mask_BT)
    n_tokens = jnp.maximum(mask_BT.sum(), 1.0)
    counts_LE = _assignments_per_expert(router, num_experts, mask_BT)
    mean_probs_LE = jnp.einsum("LBTE,BT->LE", router.probs_BTE, mask_BT) / n_tokens
    return num_experts / (L * n_tokens * top_k) * jnp.sum(counts_LE * mean_probs_LE)


def router_z_loss(router: RouterOutput, token_mask_BT: jax.Array | None = None) -> jax.Array:
    """ST-MoE's z-loss: the mean over layers and real tokens of logsumexp(router logits)^2."""
    mask_BT = _mask(router, token_mask_BT)
    z_LBT = jax.nn.logsumexp(router.logits_BTE, axis=-1)
    per_layer_L = jnp.einsum("LBT,BT->L", z_LBT**2, mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)
    return per_layer_L.mean()


def moe_aux_loss(
    router: RouterOutput, config: DbrxConfig, token_mask_BT: jax.Array | None = None
) -> jax.Array:
    """What training adds to the LM loss: the weighted load-balancing and z-losses."""
    loss = config.moe_loss_weight * load_balancing_loss(
        router, config.moe_num_experts, token_mask_BT
    )
    if config.router_z_loss_weight:
        loss = loss + config.router_z_loss_weight * router_z_loss(router, token_mask_BT)
    return loss


@struct.dataclass
class MoEStats:
    """Per layer: assignments per expert, the busiest expert's load over the mean (1.0 is
    perfect balance), the mean entropy of the router's distribution (nats), and the fraction of
    assignments dropped (capacity path only)."""

    tokens_per_expert_LE: jax.Array
    max_over_mean_load_L: jax.Array
    router_entropy_L: jax.Array
    dropped_fraction_L: jax.Array


def moe_stats(
    router: RouterOutput, num_experts: int, token_mask_BT: jax.Array | None = None
) -> MoEStats:
    mask_BT = _mask(router, token_mask_BT)
    n_tokens = jnp.maximum(mask_BT.sum(), 1.0)
    counts_LE = _assignments_per_expert(router, num_experts, mask_BT)
    log_probs_LBTE = jax.nn.log_softmax(router.logits_BTE, axis=-1)
    entropy_LBT = -jnp.sum(jnp.exp(log_probs_LBTE) * log_probs_LBTE, axis=-1)
    top_k = router.expert_ids_BTA.shape[-1]
    dropped_L = jnp.einsum("LBTA,BT->L", router.dropped_BTA.astype(jnp.float32), mask_BT)
    return MoEStats(
        tokens_per_expert_LE=counts_LE,
        max_over_mean_load_L=counts_LE.max(-1) / jnp.maximum(counts_LE.mean(-1), 1e-9),
        router_entropy_L=jnp.einsum("LBT,BT->L", entropy_LBT, mask_BT) / n_tokens,
        dropped_fraction_L=dropped_L / (n_tokens * top_k),
    )


def _assignments_per_expert(router, num_experts, mask_BT):
    one_hot_LBTAE = jax.nn.one_hot(router.expert_ids_BTA, num_experts, dtype=mask_BT.dtype)
    return jnp.einsum("LBTAE,BT->LE", one_hot_LBTAE, mask_BT)
