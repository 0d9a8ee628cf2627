"""dbrx_jax: Databricks' DBRX mixture-of-experts LLM in JAX / Flax NNX."""

from dbrx_jax.config import PRESETS, DbrxConfig
from dbrx_jax.hf import from_pretrained
from dbrx_jax.model import Dbrx, DbrxOutput
from dbrx_jax.moe import (
    MoEOutput,
    MoEStats,
    RouterOutput,
    load_balancing_loss,
    moe_aux_loss,
    moe_stats,
    router_z_loss,
)

__all__ = [
    "PRESETS",
    "Dbrx",
    "DbrxConfig",
    "DbrxOutput",
    "MoEOutput",
    "MoEStats",
    "RouterOutput",
    "from_pretrained",
    "load_balancing_loss",
    "moe_aux_loss",
    "moe_stats",
    "router_z_loss",
]
