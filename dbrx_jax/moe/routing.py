"""The router and everything computed from its decisions: the load-balancing and z-losses, and
the routing statistics training logs.

`route` decides one layer (`RouterOutput`, `[B, T, ...]`); the model stacks every layer's into a
`Routing` (`[L, B, T, ...]`), which the losses and statistics read. Shape letters as in
dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dbrx_jax.config import DbrxConfig
from dbrx_jax.nn import at_least_fp32


@struct.dataclass
class RouterOutput:
    """What the router decided for each token of one layer.

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
class Routing:
    """Every layer's `RouterOutput`, stacked: the same fields with a leading L."""

    logits_LBTE: jax.Array
    expert_ids_LBTA: jax.Array
    weights_LBTA: jax.Array
    dropped_LBTA: jax.Array

    @classmethod
    def stack(cls, stacked: RouterOutput) -> Routing:
        """From a RouterOutput whose arrays a scan over layers has stacked."""
        return cls(
            logits_LBTE=stacked.logits_BTE,
            expert_ids_LBTA=stacked.expert_ids_BTA,
            weights_LBTA=stacked.weights_BTA,
            dropped_LBTA=stacked.dropped_BTA,
        )

    @property
    def probs_LBTE(self) -> jax.Array:
        return jax.nn.softmax(self.logits_LBTE, axis=-1)


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


# ---------------------------------------------------------------------------------------------
# Losses and statistics, from every layer's routing.


def _mask(routing: Routing, token_mask_BT: jax.Array | None) -> jax.Array:
    shape = routing.logits_LBTE.shape[1:3]
    if token_mask_BT is None:
        return jnp.ones(shape, jnp.float32)
    return token_mask_BT.astype(jnp.float32)


def _assignments_per_expert(routing: Routing, num_experts: int, mask_BT: jax.Array):
    one_hot_LBTAE = jax.nn.one_hot(routing.expert_ids_LBTA, num_experts, dtype=mask_BT.dtype)
    return jnp.einsum("LBTAE,BT->LE", one_hot_LBTAE, mask_BT)


def load_balancing_loss(
    routing: Routing, num_experts: int, token_mask_BT: jax.Array | None = None
) -> jax.Array:
    """MegaBlocks' load-balancing loss, the one DBRX was trained with (unweighted).

    With T the number of real tokens and k the router's top_k:
        E / (L * T * k) * sum_l sum_e c[l, e] * P[l, e],
    where c counts the (token, slot) assignments to expert e and P is the mean router probability
    of e. Padding tokens (`token_mask_BT` False) count in neither. Multiply by `moe_loss_weight`.
    (transformers computes a different, Mixtral-style loss; the two are not equal.)
    """
    L, _, _, top_k = routing.expert_ids_LBTA.shape
    mask_BT = _mask(routing, token_mask_BT)
    n_tokens = jnp.maximum(mask_BT.sum(), 1.0)
    counts_LE = _assignments_per_expert(routing, num_experts, mask_BT)
    mean_probs_LE = jnp.einsum("LBTE,BT->LE", routing.probs_LBTE, mask_BT) / n_tokens
    return num_experts / (L * n_tokens * top_k) * jnp.sum(counts_LE * mean_probs_LE)


def router_z_loss(routing: Routing, token_mask_BT: jax.Array | None = None) -> jax.Array:
    """ST-MoE's z-loss: the mean over layers and real tokens of logsumexp(router logits)^2."""
    mask_BT = _mask(routing, token_mask_BT)
    z_LBT = jax.nn.logsumexp(routing.logits_LBTE, axis=-1)
    per_layer_L = jnp.einsum("LBT,BT->L", z_LBT**2, mask_BT) / jnp.maximum(mask_BT.sum(), 1.0)
    return per_layer_L.mean()


def moe_aux_loss(
    routing: Routing, config: DbrxConfig, token_mask_BT: jax.Array | None = None
) -> jax.Array:
    """What training adds to the LM loss: the weighted load-balancing and z-losses."""
    loss = config.moe_loss_weight * load_balancing_loss(
        routing, config.moe_num_experts, token_mask_BT
    )
    if config.moe_z_loss_weight:
        loss = loss + config.moe_z_loss_weight * router_z_loss(routing, token_mask_BT)
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
    routing: Routing, num_experts: int, token_mask_BT: jax.Array | None = None
) -> MoEStats:
    mask_BT = _mask(routing, token_mask_BT)
    n_tokens = jnp.maximum(mask_BT.sum(), 1.0)
    counts_LE = _assignments_per_expert(routing, num_experts, mask_BT)
    log_probs_LBTE = jax.nn.log_softmax(routing.logits_LBTE, axis=-1)
    entropy_LBT = -jnp.sum(jnp.exp(log_probs_LBTE) * log_probs_LBTE, axis=-1)
    top_k = routing.expert_ids_LBTA.shape[-1]
    dropped_L = jnp.einsum("LBTA,BT->L", routing.dropped_LBTA.astype(jnp.float32), mask_BT)
    return MoEStats(
        tokens_per_expert_LE=counts_LE,
        max_over_mean_load_L=counts_LE.max(-1) / jnp.maximum(counts_LE.mean(-1), 1e-9),
        router_entropy_L=jnp.einsum("LBT,BT->L", entropy_LBT, mask_BT) / n_tokens,
        dropped_fraction_L=dropped_L / (n_tokens * top_k),
    )
