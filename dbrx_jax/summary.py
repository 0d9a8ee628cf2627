"""What one asks of a config first: how big, how many FLOPs, how long to compile and run."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbrx_jax import flops
from dbrx_jax.bench import time_call
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx


def describe(config: DbrxConfig, seq_len: int) -> dict[str, float]:
    return {
        "params": config.num_params(),
        "active_params": config.num_active_params(),
        "active_matmul_params": flops.active_matmul_params(config),
        "train_flops_per_token": flops.train_flops_per_token(config, seq_len),
    }


def time_forward(
    model: Dbrx, batch_size: int, seq_len: int, *, iters: int = 5, seed: int = 0
) -> dict[str, float]:
    """Seconds to lower, compile and run one jitted forward over random tokens."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens_BT):
        return nnx.merge(graphdef, state)(tokens_BT).logits

    tokens = jnp.asarray(
        np.random.RandomState(seed).randint(0, model.config.vocab_size, (batch_size, seq_len)),
        jnp.int32,
    )
    start = time.perf_counter()
    lowered = forward.lower(state, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    step = time_call(compiled, state, tokens, iters=iters)
    return {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "step_s": step,
        "tokens_per_s": batch_size * seq_len / step,
    }


def memory_per_device(
    config: DbrxConfig, axis_sizes: dict[str, int], optimizer_moments: int = 2
) -> dict[str, float]:
    """GiB per device of parameters and optimizer state (`optimizer_moments` fp32 arrays per
    parameter: 2 for AdamW, 1 for Lion) on a mesh of these sizes; from shapes alone."""
    import optax

    from dbrx_jax import sharding

    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in sharding.MESH_AXES}
    abstract = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    moments = jax.eval_shape(optax.scale_by_adam().init, params)
    moment_bytes = sharding.bytes_per_device(moments, sizes) // 2 * optimizer_moments
    return {
        "devices": int(np.prod(list(sizes.values()))),
        "params_gib": sharding.bytes_per_device(params, sizes) / 2**30,
        "optimizer_gib": moment_bytes / 2**30,
    }


def time_train_step(
    config: DbrxConfig,
    mesh,
    batch_size: int,
    seq_len: int,
    *,
    iters: int = 5,
    seed: int = 0,
    profile_steps: int = 0,
    trace_dir: str | None = None,
) -> dict:
    """The AdamW training step of `config` on `mesh` (random tokens), compiled ahead of time:
    median step seconds and tokens/s, compile seconds, memory (XLA's buffer analysis, and the
    device's peak where it reports one), and with `profile_steps` > 0 where the time goes
    (profiling.py; the trace is kept in `trace_dir` if given)."""
    import optax

    from dbrx_jax import data, profiling, sharding, train

    tx = optax.adamw(1e-4)
    graphdef, params, opt_state = train.init_train_state(config, tx, mesh, seed=seed)
    step = train.make_train_step(graphdef, tx, mesh)
    tokens = (
        np.random.RandomState(seed)
        .randint(0, config.vocab_size, (batch_size, seq_len + 1))
        .astype(np.int32)
    )
    batch = sharding.shard_batch(data.model_batch(tokens), mesh)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, None).compile()
    compile_s = time.perf_counter() - start
    state = [params, opt_state]

    def run():
        state[0], state[1], metrics = compiled(state[0], state[1], batch, None)
        return metrics["loss"]

    seconds = time_call(run, iters=iters)
    report = {
        "step_s": seconds,
        "tokens_per_s": batch_size * seq_len / seconds,
        "compile_s": compile_s,
        "memory": _memory_report(compiled),
    }
    if profile_steps:
        report["profile"] = profiling.profile_steps(
            run, compiled.as_text(), profile_steps, trace_dir
        )
    return report


def train_report(
    config: DbrxConfig,
    mesh,
    batch_size: int,
    seq_len: int,
    *,
    iters: int = 5,
    profile_steps: int = 0,
    trace_dir: str | None = None,
    hf: dict | None = None,
) -> dict:
    """bench_train's report: `time_train_step` with model TFLOP/s and MFU (flops.py's FLOP
    count, the device kind's peak), next to transformers' figures `hf` if given."""
    from dbrx_jax import metrics

    ours = time_train_step(
        config,
        mesh,
        batch_size,
        seq_len,
        iters=iters,
        profile_steps=profile_steps,
        trace_dir=trace_dir,
    )
    flops_per_token = flops.train_flops_per_token(config, seq_len)
    peak = metrics.peak_flops()

    def mfu(tokens_per_s, devices):
        return flops_per_token * tokens_per_s / (peak * devices) if peak else None

    report = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "batch": batch_size,
        "seq_len": seq_len,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "ours": {
            **ours,
            "model_tflops": flops_per_token * ours["tokens_per_s"] / 1e12,
            "mfu": mfu(ours["tokens_per_s"], jax.device_count()),
        },
    }
    if hf is not None:
        report["hf"] = {**hf, "mfu": mfu(hf["tokens_per_s"], 1)}
        report["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    return report


def _memory_report(compiled) -> dict[str, float | None]:
    """GiB per device: XLA's analysis of the step's buffers, and the allocator's peak so far
    (GPU/TPU; None on CPU, which does not report one)."""
    analysis = compiled.memory_analysis()
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    gib = 2.0**30
    return {
        "arguments_gib": analysis.argument_size_in_bytes / gib if analysis else None,
        "temporaries_gib": analysis.temp_size_in_bytes / gib if analysis else None,
        "device_peak_gib": peak / gib if peak is not None else None,
        "device_limit_gib": stats["bytes_limit"] / gib if "bytes_limit" in stats else None,
    }


def inference_memory(
    config: DbrxConfig, axis_sizes: dict[str, int], batch: int, context: int
) -> dict[str, float]:
    """GiB per device to serve `config` (its param dtype) with a KV cache of `context` tokens
    for `batch` sequences, on a mesh of these sizes; from shapes alone."""
    from dbrx_jax import sharding
    from dbrx_jax.model import CACHE_AXES, KVCache

    sizes = {axis: int(axis_sizes.get(axis, 1)) for axis in sharding.MESH_AXES}
    params = memory_per_device(config, sizes, optimizer_moments=0)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, context))
    spec = sharding.logical_to_spec(CACHE_AXES, cache.k.shape, sizes)
    cache_block = sharding.shard_shape(cache.k.shape, spec, sizes)
    cache_gib = 2 * int(np.prod(cache_block)) * cache.k.dtype.itemsize / 2**30  # k and v
    return {
        "devices": params["devices"],
        "params_gib": params["params_gib"],
        "kv_cache_gib": cache_gib,
        "total_gib": params["params_gib"] + cache_gib,
    }
