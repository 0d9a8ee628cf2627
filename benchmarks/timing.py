"""How long what the library compiles takes: a forward pass, the training step (with its memory,
model TFLOP/s and MFU, and on request where its time goes), and generation. Every time is the
median of timed calls after untimed warm-up ones, their outputs waited on."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from benchmarks import profiling
from dbrx_jax import Dbrx, DbrxConfig, data, flops, sharding, state, train
from dbrx_jax.generate import generate
from dbrx_jax.memory import GIB


def time_call(fn: Callable, *args, iters: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn(*args)` (outputs blocked on), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab_size, shape).astype(np.int32)


def time_forward(
    model: Dbrx, batch_size: int, seq_len: int, *, iters: int = 5, seed: int = 0
) -> dict[str, float]:
    """Seconds to lower, compile and run one jitted forward over random tokens."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens_BT):
        return nnx.merge(graphdef, params)(tokens_BT).logits

    tokens_BT = jnp.asarray(random_tokens(model.config.vocab_size, (batch_size, seq_len), seed))
    start = time.perf_counter()
    lowered = forward.lower(params, tokens_BT)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    step_s = time_call(compiled, params, tokens_BT, iters=iters)
    return {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "step_s": step_s,
        "tokens_per_s": batch_size * seq_len / step_s,
    }


def time_train_step(
    config: DbrxConfig,
    mesh: Mesh,
    batch_size: int,
    seq_len: int,
    *,
    iters: int = 5,
    seed: int = 0,
    profile_steps: int = 0,
    trace_dir: str | None = None,
) -> dict:
    """The AdamW training step of `config` on `mesh` (random tokens), compiled ahead of time:
    median step seconds and tokens/s, compile seconds, memory (`memory_report`), and with
    `profile_steps` > 0 where the time goes (profiling.py; the trace is kept in `trace_dir` if
    given)."""
    tx = optax.adamw(1e-4)
    graphdef, params, opt_state, frozen = state.init_train_state(config, tx, mesh, seed=seed)
    step = train.make_train_step(graphdef, tx)  # a LoRA config trains its adapters alone
    tokens = random_tokens(config.vocab_size, (batch_size, seq_len + 1), seed)
    batch = sharding.shard_batch(data.model_batch(tokens), mesh)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, None, frozen).compile()
    compile_s = time.perf_counter() - start
    train_state = [params, opt_state]  # the step donates both: carry the new ones forward

    def run():
        train_state[0], train_state[1], metrics = compiled(*train_state, batch, None, frozen)
        return metrics["loss"]

    step_s = time_call(run, iters=iters)
    report = {
        "step_s": step_s,
        "tokens_per_s": batch_size * seq_len / step_s,
        "compile_s": compile_s,
        "memory": memory_report(compiled),
    }
    if profile_steps:
        report["profile"] = profiling.profile_steps(
            run, compiled.as_text(), profile_steps, trace_dir
        )
    return report


def train_report(
    config: DbrxConfig,
    mesh: Mesh,
    batch_size: int,
    seq_len: int,
    *,
    iters: int = 5,
    profile_steps: int = 0,
    trace_dir: str | None = None,
    hf: dict | None = None,
) -> dict:
    """bench_train's report: `time_train_step` with model TFLOP/s and MFU (flops.py's FLOP
    count, the device kind's peak), next to transformers' figures `hf` (one device) if given."""
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
    peak = flops.peak_flops()

    def mfu(tokens_per_s, devices):
        return flops_per_token * tokens_per_s / (peak * devices) if peak else None

    report = {
        "device": jax.devices()[0].device_kind,
        "devices": mesh.size,
        "batch": batch_size,
        "seq_len": seq_len,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "ours": {
            **ours,
            "model_tflops": flops_per_token * ours["tokens_per_s"] / 1e12,
            "mfu": mfu(ours["tokens_per_s"], mesh.size),
        },
    }
    if hf is not None:
        report["hf"] = {**hf, "mfu": mfu(hf["tokens_per_s"], 1)}
        report["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    return report


def memory_report(compiled) -> dict[str, float | None]:
    """GiB per device of a compiled step: XLA's analysis of its buffers, and the allocator's peak
    so far and limit (GPU and TPU; None on CPU, which reports neither)."""
    analysis = compiled.memory_analysis()
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    limit = stats.get("bytes_limit")
    return {
        "arguments_gib": analysis.argument_size_in_bytes / GIB if analysis else None,
        "temporaries_gib": analysis.temp_size_in_bytes / GIB if analysis else None,
        "device_peak_gib": peak / GIB if peak is not None else None,
        "device_limit_gib": limit / GIB if limit is not None else None,
    }


def generate_benchmark(
    config: DbrxConfig, batch: int, prompt_len: int, new_tokens: int, *, iters: int = 3
) -> dict[str, float]:
    """Prefill and decode tokens/s of `generate` on a random model (every new token is made: no
    stop ids). Decode time is the difference between `new_tokens` and 1 new token."""
    model = Dbrx(config, rngs=nnx.Rngs(0))
    prompts = random_tokens(config.vocab_size, (batch, prompt_len)).tolist()

    def run(n):
        return generate(model, prompts, max_new_tokens=n).tokens_BX

    prefill_s = time_call(run, 1, iters=iters)
    decode_s = max(time_call(run, new_tokens, iters=iters) - prefill_s, 1e-9)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_s": decode_s / (new_tokens - 1),
    }
