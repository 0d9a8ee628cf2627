"""DBRX's mixture-of-experts FFN as an NNX module: the router and E GLU experts, run as the
model's plan says (moe/plan.py). Shape letters as in dbrx_jax/model/__init__.py."""

from __future__ import annotations

import jax
from flax import nnx, struct

from dbrx_jax import lora
from dbrx_jax.config import DbrxConfig
from dbrx_jax.moe import dispatch, exchange
from dbrx_jax.moe.plan import MoEPlan, plan_moe
from dbrx_jax.moe.routing import RouterOutput, route
from dbrx_jax.nn import param
from dbrx_jax.quant import dense

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@struct.dataclass
class MoEOutput:
    y_BTD: jax.Array
    router: RouterOutput


class MoE(nnx.Module):
    """Router plus E GLU experts, stored as real `[E, D, F]` / `[E, F, D]` arrays.

    plan: how to run (dispatch, grouped GEMM, expert exchange); by default the single-device
    plan of `config` (`Dbrx` passes the plan of its mesh)."""

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs, plan: MoEPlan | None = None):
        c = config
        D, E, F = c.d_model, c.moe_num_experts, c.ffn_hidden_size
        std = c.initializer_range
        self.router = param(rngs, (D, E), ("embed", "expert_logits"), c, std=std)
        self.w1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.v1 = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c, std=std)
        self.w2 = param(rngs, (E, F, D), ("expert", "mlp", "embed"), c, std=std)
        adapted = lora.targets(c)
        for name in ("router", "w1", "v1", "w2"):
            weight = getattr(self, name)
            adapter = None
            if f"ffn.{name}" in adapted:
                axes = weight.get_metadata("logical_axes")
                adapter = lora.Adapter(c, f"ffn.{name}", weight.shape, axes, rngs=rngs)
            setattr(self, f"{name}_lora", nnx.data(adapter))
        self.config = c
        self.plan = plan if plan is not None else plan_moe(c)

    def __call__(self, x_BTD: jax.Array, jitter_key: jax.Array | None = None) -> MoEOutput:
        c, plan = self.config, self.plan
        router_DE = self.router[...]
        if self.router_lora is not None:  # [D, E]: merged, a rank-r update of a tiny matrix
            router_DE = router_DE + self.router_lora.delta().astype(router_DE.dtype)
        with jax.named_scope("router"):
            routing = route(
                x_BTD,
                router_DE,
                top_k=c.moe_top_k,
                normalize_p=c.moe_normalize_expert_weights,
                jitter_eps=c.moe_jitter_eps,
                jitter_key=jitter_key,
            )
        w1, v1, w2 = (
            self._expert_weight(w, adapter)
            for w, adapter in (
                (self.w1, self.w1_lora),
                (self.v1, self.v1_lora),
                (self.w2, self.w2_lora),
            )
        )
        act = ACTIVATIONS[c.ffn_act_fn]
        if plan.expert_parallel:
            y_BTD = exchange.sharded_experts(
                x_BTD, routing.expert_ids_BTA, routing.weights_BTA, w1, v1, w2, act=act, plan=plan
            )
            return MoEOutput(y_BTD=y_BTD, router=routing)
        B, T, D = x_BTD.shape
        impl = plan.dispatch_for(routing.expert_ids_BTA.size)
        adapted = isinstance(w1, lora.LowRank) or isinstance(v1, lora.LowRank)
        if plan.fuse_gate_up and impl in ("dropless", "capacity") and not adapted:
            w1, v1 = dispatch.fuse_gate_up(w1, v1), None
        y_MD, dropped_MA = dispatch.experts(
            x_BTD.reshape(B * T, D),
            routing.expert_ids_BTA.reshape(B * T, -1),
            routing.weights_BTA.reshape(B * T, -1),
            w1,
            v1,
            w2,
            act=act,
            impl=impl,
            gmm=plan.gmm,
            capacity_factor=plan.capacity_factor,
        )
        routing = routing.replace(dropped_BTA=dropped_MA.reshape(B, T, -1))
        return MoEOutput(y_BTD=y_MD.reshape(B, T, D), router=routing)

    def _expert_weight(self, w: nnx.Param, adapter: lora.Adapter | None):
        """An expert weight in the compute dtype, with its adapter if it has one."""
        w = dense(w.get_value(), self.config.compute_dtype)  # dequantized (QLoRA) here
        return w if adapter is None else adapter.low_rank(w)
