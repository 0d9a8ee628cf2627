"""What every layer shares: parameters carrying their logical axis names, the precision rule,
and the names under which matmul results may be saved for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dbrx_jax.config import DbrxConfig

# The results the "matmuls" remat policy keeps (model/dbrx.py): each is tagged with
# `saved_for_backward` where it is computed.
MATMUL_RESULTS = ("qkv", "attention", "attention_out", "expert_gate_up", "expert_down")


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    logical_axes: tuple[str, ...],
    config: DbrxConfig,
    *,
    std: float | None = None,
) -> nnx.Param:
    """A parameter in `config.param_dtype` with its logical axis names (mapped to mesh axes by
    sharding.LOGICAL_RULES). `std=None` means ones (norm scales); otherwise normal(0, std), as the
    reference initialises every matrix (`initializer_range`)."""
    assert len(shape) == len(logical_axes), (shape, logical_axes)
    dtype = config.weight_dtype
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=logical_axes)


def at_least_fp32(dtype) -> jnp.dtype:
    """float32 for 16- and 32-bit inputs; float64 stays float64 (for the exactness tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def saved_for_backward(x: jax.Array, name: str) -> jax.Array:
    """Tags a matmul result so that the "matmuls" remat policy keeps it."""
    assert name in MATMUL_RESULTS, name
    return checkpoint_name(x, name)
