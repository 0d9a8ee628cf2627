"""The programs the trainer and the generator run, as jitted functions with abstract arguments
(ShapeDtypeStructs carrying their shardings) on any mesh: what `aot_compile.py` compiles for a
TPU slice, with no array allocated.

  train    train.make_train_step: the donated state, gradient accumulation, remat, the MoE plan
  prefill  a batch of prompts through the model into a fresh KV cache
  decode   one token per row against a KV cache of `context` slots (the cache donated)

Shape letters as in dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dbrx_jax import flops, sharding, state, train
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx, KVCache
from dbrx_jax.optim import make_optimizer

STEPS = ("train", "prefill", "decode")
BATCH_KEYS = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
    "loss_mask": jnp.float32,
}
_CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and abstract arguments to lower it with."""

    step: str
    fn: Callable
    args: tuple
    tokens: int  # tokens one call processes (the global batch)
    model_flops: float  # our count for one call, all devices together
    arg_groups: dict[str, object]  # name -> the args' subtree it labels (for memory)


def _sharded(shape, dtype, mesh: Mesh, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _batch_spec(ndim: int) -> P:
    return P(sharding.BATCH_AXES, *([None] * (ndim - 1)))


def train_program(
    experiment: ml_collections.ConfigDict, model_config: DbrxConfig, mesh: Mesh
) -> Program:
    """The trainer's own step (train.make_train_step) for `experiment`'s batch and seq_len."""
    tx = make_optimizer(experiment)
    graphdef, params, opt_state, frozen = state.abstract_train_state(model_config, tx, mesh)
    step = train.make_train_step(graphdef, tx, experiment.grad_accum_steps)
    B, T = experiment.batch_size, experiment.seq_len
    batch = {k: _sharded((B, T), dtype, mesh, _batch_spec(2)) for k, dtype in BATCH_KEYS.items()}
    key = jax.eval_shape(lambda: jax.random.key(0)) if model_config.moe_jitter_eps else None
    tokens = B * T
    return Program(
        step="train",
        fn=step,
        args=(params, opt_state, batch, key, frozen),
        tokens=tokens,
        model_flops=float(flops.train_flops_per_token(model_config, T)) * tokens,
        arg_groups={
            "parameters": params,
            "optimizer state": opt_state,
            "batch": batch,
            **({"frozen base": frozen} if frozen else {}),
        },
    )


def _abstract_model(model_config: DbrxConfig, mesh: Mesh):
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Dbrx(model_config, rngs=nnx.Rngs(0), mesh=mesh)), nnx.Param
    )
    return graphdef, sharding.abstract_on(params, mesh)


def _abstract_cache(model_config: DbrxConfig, mesh: Mesh, batch: int, slots: int) -> KVCache:
    cache = jax.eval_shape(lambda: KVCache.zeros(model_config, batch, slots))
    sizes = dict(mesh.shape)
    kv_spec = sharding.logical_to_spec(_CACHE_AXES, cache.k_LBSKH.shape, sizes)
    seg_spec = sharding.logical_to_spec(("batch", "seq"), (batch, slots), sizes)
    return KVCache(
        k_LBSKH=_sharded(cache.k_LBSKH.shape, cache.k_LBSKH.dtype, mesh, kv_spec),
        v_LBSKH=_sharded(cache.v_LBSKH.shape, cache.v_LBSKH.dtype, mesh, kv_spec),
        segment_ids_BS=_sharded((batch, slots), jnp.int32, mesh, seg_spec),
        length=_sharded((), jnp.int32, mesh, P()),
    )


def _forward_flops(model_config: DbrxConfig, tokens: int, context: int) -> float:
    """A forward pass is a third of training's 6N + attention count."""
    return flops.train_flops_per_token(model_config, context) * tokens / 3


def prefill_program(model_config: DbrxConfig, mesh: Mesh, batch: int, seq_len: int) -> Program:
    """Prompts of `seq_len` tokens into a cache of `seq_len` slots: (last logits, cache)."""
    graphdef, params = _abstract_model(model_config, mesh)
    sizes = dict(mesh.shape)
    token_spec = sharding.logical_to_spec(("batch", "seq"), (batch, seq_len), sizes)
    cache_out = _abstract_cache(model_config, mesh, batch, seq_len)

    @jax.jit
    def prefill(params, tokens_BT, segment_ids_BT):
        model = nnx.merge(graphdef, params)
        cache = KVCache.zeros(model.config, tokens_BT.shape[0], tokens_BT.shape[1])
        out = model(tokens_BT, segment_ids_BT=segment_ids_BT, cache=cache, last_only=True)
        return out.logits, jax.lax.with_sharding_constraint(
            out.cache, jax.tree.map(lambda x: x.sharding, cache_out)
        )

    tokens = _sharded((batch, seq_len), jnp.int32, mesh, token_spec)
    return Program(
        step="prefill",
        fn=prefill,
        args=(params, tokens, tokens),
        tokens=batch * seq_len,
        model_flops=_forward_flops(model_config, batch * seq_len, seq_len),
        arg_groups={"parameters": params, "batch": (tokens, tokens)},
    )


def decode_program(model_config: DbrxConfig, mesh: Mesh, batch: int, context: int) -> Program:
    """One new token per row against a cache of `context` slots (donated): (logits, cache)."""
    graphdef, params = _abstract_model(model_config, mesh)
    cache = _abstract_cache(model_config, mesh, batch, context)
    token_spec = sharding.logical_to_spec(("batch", "seq"), (batch, 1), dict(mesh.shape))

    def decode(params, token_B1, cache_in):
        out = nnx.merge(graphdef, params)(token_B1, cache=cache_in, last_only=True)
        return out.logits, jax.lax.with_sharding_constraint(
            out.cache, jax.tree.map(lambda x: x.sharding, cache)
        )

    token = _sharded((batch, 1), jnp.int32, mesh, token_spec)
    return Program(
        step="decode",
        fn=jax.jit(decode, donate_argnums=(2,)),
        args=(params, token, cache),
        tokens=batch,
        model_flops=_forward_flops(model_config, batch, context),
        arg_groups={"parameters": params, "KV cache": cache, "batch": token},
    )
