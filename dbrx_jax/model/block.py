"""One DBRX block, the same code for training, prefill and decoding:

    h = h + attn(norm_1(h))       (with a KV cache when one is given)
    h = h + moe(norm_2(h))

Shape letters as in dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import jax
from flax import nnx

from dbrx_jax.config import DbrxConfig
from dbrx_jax.model.layers import Attention, LayerCache, LayerNorm
from dbrx_jax.moe.layer import MoE
from dbrx_jax.moe.plan import MoEPlan
from dbrx_jax.moe.routing import RouterOutput
from dbrx_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "seq", "act_embed")  # the residual stream between blocks


class DbrxBlock(nnx.Module):
    def __init__(self, config: DbrxConfig, plan: MoEPlan, *, rngs: nnx.Rngs):
        self.norm_1 = LayerNorm(config)
        self.attn = Attention(config, rngs=rngs, mesh=plan.mesh)
        self.norm_2 = LayerNorm(config)
        self.ffn = MoE(config, rngs=rngs, plan=plan)

    def __call__(
        self,
        h_BTD: jax.Array,
        cos_BTH: jax.Array,
        sin_BTH: jax.Array,
        mask_B1TS: jax.Array | None,
        cache: LayerCache | None = None,
        jitter_key: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, RouterOutput, LayerCache | None]:
        """The block on T tokens: the new residual stream, the router's decisions, and the
        layer's updated KV cache (None without one). See Attention for the cache, mask and
        segment ids."""
        attn_BTD, cache = self.attn(
            self.norm_1(h_BTD), cos_BTH, sin_BTH, mask_B1TS, cache, segment_ids_BT
        )
        h_BTD = h_BTD + attn_BTD
        moe = self.ffn(self.norm_2(h_BTD), jitter_key)
        return constrain(h_BTD + moe.y_BTD, ACTIVATION_AXES, self.ffn.plan.mesh), moe.router, cache
