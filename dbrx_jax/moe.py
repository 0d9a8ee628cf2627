"""DBRX's mixture-of-experts FFN: the router, the GLU experts, and the dispatch.

Shape legend: B batch, T tokens, D d_model, E experts, F expert hidden size, A the top_k
active slots of a token, L layers.

The dispatch implementations sit behind `DbrxConfig.moe_impl`. `dense` is the simple exact
reference: every expert runs on every token and the outputs are mixed with the sparse gate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dbrx_jax.config import DbrxConfig
from dbrx_jax.layers import at_least_fp32, param

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@struct.dataclass
class RouterOutput:
    """What the router decided for each token; per layer, stacked to `[L, ...]` by the model.

    logits_BTE: router logits in fp32 (softmax them for the probabilities).
    expert_ids_BTA: the top_k experts chosen, by decreasing probability (int32).
    weights_BTA: their mixing weights after the p-norm renormalisation (fp32).
    """

    logits_BTE: jax.Array
    expert_ids_BTA: jax.Array
    weights_BTA: jax.Array

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
    )


def dense_experts(
    x_BTD: jax.Array,
    routing: RouterOutput,
    w1_EDF: jax.Array,
    v1_EDF: jax.Array,
    w2_EFD: jax.Array,
    act,
) -> jax.Array:
    """The reference dispatch: every expert on every token, mixed by the sparse gate.

    1. gate_BTE: the renormalised weight of each chosen expert, zero elsewhere.
    2. y_e = (act(x @ w1_e) * (x @ v1_e)) @ w2_e for every expert e (w2 is `[E, F, D]`).
    3. y = sum_e gate_e * y_e, in fp32, cast back to the activation dtype.
    E / top_k times the FLOPs of a sparse dispatch: for tests and small models only.
    """
    num_experts = w1_EDF.shape[0]
    one_hot_BTAE = jax.nn.one_hot(
        routing.expert_ids_BTA, num_experts, dtype=routing.weights_BTA.dtype
    )
    gate_BTE = jnp.einsum("BTA,BTAE->BTE", routing.weights_BTA, one_hot_BTAE)
    gate_up_BTEF = act(jnp.einsum("BTD,EDF->BTEF", x_BTD, w1_EDF))
    hidden_BTEF = gate_up_BTEF * jnp.einsum("BTD,EDF->BTEF", x_BTD, v1_EDF)
    y_BTED = jnp.einsum("BTEF,EFD->BTED", hidden_BTEF, w2_EFD)
    acc_dtype = at_least_fp32(x_BTD.dtype)
    y_BTD = jnp.einsum("BTE,BTED->BTD", gate_BTE.astype(acc_dtype), y_BTED.astype(acc_dtype))
    return y_BTD.astype(x_BTD.dtype)


class MoE(nnx.Module):
    """Router plus E GLU experts, stored as real `[E, D, F]` / `[E, F, D]` arrays."""

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs):
        c = config
        D, E, F = c.d_model, c.moe_num_experts, c.ffn_hidden_size
        std = c.initializer_range
        self.router = param(rngs, (D, E), ("embed", "expert_logits"), c, std=std)
        self.w1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.v1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.w2 = param(rngs, (E, F, D), ("expert", "mlp", "embed"), c, std=std)
        self.top_k = c.moe_top_k
        self.normalize_p = c.moe_normalize_expert_weights
        self.jitter_eps = c.moe_jitter_eps
        self.act = ACTIVATIONS[c.ffn_act_fn]
        self.impl = c.moe_impl
        self.dtype = c.compute_dtype

    def __call__(self, x_BTD: jax.Array, jitter_key: jax.Array | None = None) -> MoEOutput:
        routing = route(
            x_BTD,
            self.router[...],
            top_k=self.top_k,
            normalize_p=self.normalize_p,
            jitter_eps=self.jitter_eps,
            jitter_key=jitter_key,
        )
        w1, v1, w2 = (w[...].astype(self.dtype) for w in (self.w1, self.v1, self.w2))
        if self.impl == "dense":
            y_BTD = dense_experts(x_BTD, routing, w1, v1, w2, self.act)
        else:
            raise ValueError(f"moe_impl {self.impl!r}: expected 'dense'")
        return MoEOutput(y_BTD=y_BTD, router=routing)


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
    probs_LBTE = router.probs_BTE
    mask_BT = (
        jnp.ones(probs_LBTE.shape[1:3], probs_LBTE.dtype)
        if token_mask_BT is None
        else token_mask_BT.astype(probs_LBTE.dtype)
    )
    n_tokens = jnp.maximum(mask_BT.sum(), 1.0)
    counts_LE = jnp.einsum(
        "LBTAE,BT->LE",
        jax.nn.one_hot(router.expert_ids_BTA, num_experts, dtype=mask_BT.dtype),
        mask_BT,
    )
    mean_probs_LE = jnp.einsum("LBTE,BT->LE", probs_LBTE, mask_BT) / n_tokens
    return num_experts / (L * n_tokens * top_k) * jnp.sum(counts_LE * mean_probs_LE)
