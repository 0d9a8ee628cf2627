"""Memory per device from shapes alone: a model's parameters and optimizer state, and a served
model's KV cache, on a mesh of any size (the mesh need not exist: planning at full scale)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import optax
from flax import nnx

from dbrx_jax import sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx, KVCache
from dbrx_jax.model.dbrx import CACHE_AXES

GIB = 2.0**30


def _axis_sizes(axis_sizes: Mapping[str, int]) -> dict[str, int]:
    return {axis: int(axis_sizes.get(axis, 1)) for axis in sharding.MESH_AXES}


def memory_per_device(
    config: DbrxConfig, axis_sizes: Mapping[str, int], optimizer_moments: int = 2
) -> dict[str, float]:
    """GiB per device of parameters and optimizer state (`optimizer_moments` arrays per
    parameter in the parameters' dtype, as optax keeps them: 2 for AdamW, 1 for Lion) on a mesh
    of these sizes."""
    sizes = _axis_sizes(axis_sizes)
    abstract = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    moments = jax.eval_shape(optax.scale_by_adam().init, params)
    moment_bytes = sharding.bytes_per_device(moments, sizes) // 2 * optimizer_moments
    return {
        "devices": math.prod(sizes.values()),
        "params_gib": sharding.bytes_per_device(params, sizes) / GIB,
        "optimizer_gib": moment_bytes / GIB,
    }


def inference_memory(
    config: DbrxConfig, axis_sizes: Mapping[str, int], batch: int, context: int
) -> dict[str, float]:
    """GiB per device to serve `config` (its param dtype) with a KV cache of `context` tokens
    for `batch` sequences, on a mesh of these sizes."""
    sizes = _axis_sizes(axis_sizes)
    params = memory_per_device(config, sizes, optimizer_moments=0)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context))
    k = cache.k_LBSKH
    block = sharding.shard_shape(
        k.shape, sharding.logical_to_spec(CACHE_AXES, k.shape, sizes), sizes
    )
    cache_gib = 2 * math.prod(block) * k.dtype.itemsize / GIB  # keys and values
    return {
        "devices": params["devices"],
        "params_gib": params["params_gib"],
        "kv_cache_gib": cache_gib,
        "total_gib": params["params_gib"] + cache_gib,
    }
