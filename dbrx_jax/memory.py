"""Memory per device from shapes alone: a model's parameters and optimizer state, and a served
model's KV cache, on a mesh of any size (the mesh need not exist: planning at full scale)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import optax
from flax import nnx

from dbrx_jax import quant, sharding
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


def lora_memory_per_device(
    config: DbrxConfig,
    axis_sizes: Mapping[str, int],
    *,
    base_bits: int | None = None,
    group_size: int = 64,
    optimizer_moments: int = 2,
) -> dict[str, float]:
    """GiB per device of a LoRA run (`config.lora_rank` > 0): the frozen base (in
    `config.param_dtype`, or its block matrices at `base_bits` 8 or 4 with one fp32 scale per
    `group_size` values, as quant.py stores them), and the adapters with their gradients and
    `optimizer_moments` fp32 moments (what trains). Activations are not counted."""
    if not config.lora_rank:
        raise ValueError("lora_memory_per_device: config.lora_rank is 0 (no adapters)")
    if base_bits not in (None, 4, 8):
        raise ValueError(f"base_bits={base_bits!r}: expected None (unquantized), 8 or 4")
    sizes = _axis_sizes(axis_sizes)
    abstract = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    adapters = nnx.state(abstract, nnx.LoRAParam)
    base = nnx.state(abstract, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    base_bytes = 0.0
    for path, variable in nnx.to_flat_state(base):
        stored = sharding.bytes_per_device(nnx.State({"w": variable}), sizes)
        if base_bits and str(path[-1]) in quant.BLOCK_WEIGHTS:
            values = stored / variable.dtype.itemsize  # elements on this device
            stored = values * base_bits / 8 + values / group_size * 4  # + fp32 scales
        base_bytes += stored
    adapter_bytes = sharding.bytes_per_device(adapters, sizes)
    return {
        "devices": math.prod(sizes.values()),
        "base_gib": base_bytes / GIB,
        "adapters_gib": adapter_bytes / GIB,
        "adapter_grads_gib": adapter_bytes / GIB,
        "optimizer_gib": optimizer_moments * adapter_bytes / GIB,
        "total_gib": (base_bytes + (2 + optimizer_moments) * adapter_bytes) / GIB,
    }
