"""dbrx_jax: Databricks' DBRX mixture-of-experts LLM in JAX / Flax NNX."""

from dbrx_jax.config import PRESETS, DbrxConfig

__all__ = ["PRESETS", "DbrxConfig"]
