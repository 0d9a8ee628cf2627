"""Timing helpers and the MoE dispatch benchmark (driven by experiments/bench_moe.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dbrx_jax import checkpoint
from dbrx_jax.convert import pieces
from dbrx_jax.hf import TENSOR_MAPS
from dbrx_jax.moe import ACTIVATIONS
from dbrx_jax.moe_dispatch import experts
from dbrx_jax.safetensors_io import SafetensorsCheckpoint, SafetensorsWriter


def run_hf_worker(script: str, argv: Sequence[str]):
    """transformers' side of a comparison: `python script --hf_worker ARGV` (without
    --compare_hf / --json_out) in its own process, with JAX on CPU there; returns the JSON of its
    last output line. Call it before this process touches the accelerator: XLA preallocates most
    of its memory on first use, which would starve PyTorch."""
    args = [a for a in argv if not a.startswith(("--compare_hf", "--json_out"))]
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, script, "--hf_worker", *args], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise RuntimeError(f"the transformers worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def routing(
    kind: str, tokens: int, experts: int, top_k: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids `[T, A]` (distinct per token) and renormalised weights `[T, A]`.

    balanced: every expert gets exactly T * k / E assignments (round robin).
    skewed: experts drawn with Zipf-like popularity p_e ~ 1 / (e + 1): the first two experts
      take about a third of all assignments, the way an unbalanced router behaves early on.
    """
    rng = np.random.RandomState(seed)
    if kind == "balanced":
        ids = (np.arange(tokens)[:, None] * top_k + np.arange(top_k)) % experts
    elif kind == "skewed":
        log_p = -np.log(np.arange(1, experts + 1))
        gumbel = rng.gumbel(size=(tokens, experts))
        ids = np.argsort(-(log_p + gumbel), axis=1)[:, :top_k]  # sampling without replacement
    else:
        raise ValueError(f"routing {kind!r}: expected 'balanced' or 'skewed'")
    weights = rng.dirichlet(np.ones(top_k), size=tokens)
    return ids.astype(np.int32), weights.astype(np.float32)


def moe_benchmark(
    *,
    tokens: int,
    d_model: int,
    ffn: int,
    num_experts: int,
    top_k: int,
    dtype: str,
    impls: Sequence[str],
    routings: Sequence[str],
    capacity_factor: float = 1.0,
    iters: int = 5,
    act: str = "silu",
) -> list[dict]:
    """Forward and forward+backward time of each dispatch `impl` ("dense", "capacity",
    "dropless" or "dropless:<gmm_impl>"), next to a plain matmul of the same FLOPs.

    The backward is a VJP with a random cotangent: a `.sum()` loss would let XLA skip work."""
    dt = jnp.dtype(dtype)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(tokens, d_model), dt)
    w1, v1 = (jnp.asarray(rng.randn(num_experts, d_model, ffn) / d_model**0.5, dt) for _ in "wv")
    w2 = jnp.asarray(rng.randn(num_experts, ffn, d_model) / ffn**0.5, dt)
    cotangent = jnp.asarray(rng.randn(tokens, d_model), dt)
    flops_fwd = 2 * tokens * top_k * 3 * d_model * ffn
    rows = []

    lhs = jnp.asarray(rng.randn(tokens * top_k, d_model), dt)
    rhs = jnp.asarray(rng.randn(d_model, 3 * ffn), dt)
    matmul = jax.jit(jnp.matmul)
    matmul_vjp = jax.jit(lambda a, b, g: jax.vjp(jnp.matmul, a, b)[1](g))
    g_out = jnp.asarray(rng.randn(tokens * top_k, 3 * ffn), dt)
    rows.append(
        _row(
            "matmul (ceiling)",
            "-",
            time_call(matmul, lhs, rhs, iters=iters),
            time_call(matmul_vjp, lhs, rhs, g_out, iters=iters),
            flops_fwd,
            0.0,
        )
    )
    for kind in routings:
        ids_np, weights_np = routing(kind, tokens, num_experts, top_k)
        ids, weights = jnp.asarray(ids_np), jnp.asarray(weights_np)
        for name in impls:
            impl, _, gmm_impl = name.partition(":")

            def forward(x, weights, w1, v1, w2, ids=ids, impl=impl, gmm_impl=gmm_impl or "auto"):
                return experts(
                    x,
                    ids,
                    weights,
                    w1,
                    v1,
                    w2,
                    act=ACTIVATIONS[act],
                    impl=impl,
                    gmm_impl=gmm_impl,
                    capacity_factor=capacity_factor,
                )

            fwd = jax.jit(forward)
            fwd_bwd = jax.jit(
                lambda args, g, forward=forward: jax.vjp(lambda *a: forward(*a)[0], *args)[1](g)
            )
            args = (x, weights, w1, v1, w2)
            try:
                dropped = float(jnp.mean(fwd(*args)[1]))
                fwd_s = time_call(fwd, *args, iters=iters)
                fwd_bwd_s = time_call(fwd_bwd, args, cotangent, iters=iters)
            except Exception as error:  # one kernel that fails must not cost the other rows
                rows.append({"impl": name, "routing": kind, "error": f"{error!r}"[:500]})
                continue
            rows.append(_row(name, kind, fwd_s, fwd_bwd_s, flops_fwd, dropped))
    return rows


def _row(impl, routing_kind, fwd_s, fwd_bwd_s, flops_fwd, dropped):
    return {
        "impl": impl,
        "routing": routing_kind,
        "fwd_ms": 1e3 * fwd_s,
        "fwd_bwd_ms": 1e3 * fwd_bwd_s,
        "fwd_tflops": flops_fwd / fwd_s / 1e12,
        "fwd_bwd_tflops": 3 * flops_fwd / fwd_bwd_s / 1e12,
        "dropped": dropped,
    }


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'impl':22s} {'routing':9s} {'fwd ms':>9s} {'TFLOP/s':>8s} "
        f"{'fwd+bwd ms':>11s} {'TFLOP/s':>8s} {'dropped':>8s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['impl']:22s} {r['routing']:9s} failed: {r['error'][:120]}")
            continue
        lines.append(
            f"{r['impl']:22s} {r['routing']:9s} {r['fwd_ms']:9.2f} {r['fwd_tflops']:8.3f} "
            f"{r['fwd_bwd_ms']:11.2f} {r['fwd_bwd_tflops']:8.3f} {r['dropped']:8.1%}"
        )
    return "\n".join(lines)


def hf_train_step_benchmark(
    config, batch_size: int, seq_len: int, *, iters: int = 5, dtype: str = "float32"
) -> dict[str, float]:
    """Tokens/s of transformers' DbrxForCausalLM training step (forward, backward, AdamW) on
    the same config: the PyTorch reference we compare against. Needs the `test` extras (torch,
    transformers); run it in its own process (bench_train.py --compare_hf does)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _hf_model(config, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def step():
        loss = model(tokens, labels=tokens, output_router_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return None

    seconds = time_call(step, iters=iters)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {
        "step_s": seconds,
        "tokens_per_s": batch_size * seq_len / seconds,
        "peak_memory_gb": peak_gb,
        "device": device,
    }


def _hf_model(config, device: str, dtype: str):
    """transformers' DbrxForCausalLM for `config` (sdpa attention), random weights."""
    import torch
    import transformers

    hf_config = transformers.DbrxConfig(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    model = transformers.DbrxForCausalLM(hf_config).to(device=device, dtype=getattr(torch, dtype))
    for block in model.transformer.blocks:  # transformers 5.x cannot clamp with clip_qkv None
        if block.norm_attn_norm.attn.clip_qkv is None:
            block.norm_attn_norm.attn.clip_qkv = float("inf")
    return model


def checkpoint_benchmark(directory: str, gib: float = 1.0, arrays: int = 16) -> dict[str, float]:
    """Seconds to save a `gib` GiB state asynchronously (the part that blocks the training loop,
    and until it is on disk) and to restore it, with the training Checkpointer."""

    per_array = int(gib * 2**30 / 4 / arrays)
    key = jax.random.key(0)
    state = {
        f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (per_array,), jnp.float32)
        for i in range(arrays)
    }
    jax.block_until_ready(state)
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    saver = checkpoint.Checkpointer(directory, async_save=True)
    start = time.perf_counter()
    saver.save(1, state, iterator, {})
    blocking = time.perf_counter() - start
    saver.wait()
    total = time.perf_counter() - start
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    start = time.perf_counter()
    restored = saver.restore(1, abstract, iter(grain.MapDataset.range(4).to_iter_dataset()))
    jax.block_until_ready(restored)
    restore = time.perf_counter() - start
    saver.close()
    return {"gib": gib, "save_blocking_s": blocking, "save_total_s": total, "restore_s": restore}


def synthetic_hf_checkpoint(
    directory: str, config, *, seed: int = 0, shard_bytes: int = 5 * 10**9
) -> int:
    """A DBRX checkpoint with the real tensor names and shapes and random bf16 bits, written
    piece by piece (never a whole model in memory). Returns its size in bytes."""

    os.makedirs(directory, exist_ok=True)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(seed)
    order = [(row, None) for row in TENSOR_MAPS if not row.per_layer]
    order += [(row, i) for i in range(config.n_layers) for row in TENSOR_MAPS if row.per_layer]
    shards, size = [[]], 0
    for row, layer in order:
        nbytes = int(np.prod(row.hf_shape(config))) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append((row, layer))
        size += nbytes
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(
            os.path.join(directory, name),
            [(r.hf_name.format(i=i), bf16, r.hf_shape(config)) for r, i in shard],
        )
        for row, layer in shard:
            tensor = row.hf_name.format(i=layer)
            weight_map[tensor] = name
            shape = row.hf_shape(config)
            n_pieces = len(pieces(row, config))
            for _ in range(n_pieces):
                rows = shape[0] // n_pieces
                bits = rng.integers(0, 2**16, (rows, *shape[1:]), dtype=np.uint16)
                writer.write(tensor, bits.view(bf16))
                total += bits.nbytes
        writer.close()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return total


def convert_benchmark(workdir: str, config, *, keep: bool = False) -> dict[str, float]:
    """hf_to_jax and jax_to_hf of a synthetic checkpoint (each in its own process, which
    reports its peak RSS), next to a plain copy of the same files; then a bitwise check."""

    hf, ours, back, copy = (os.path.join(workdir, n) for n in ("hf", "ours", "back", "copy"))
    for path in (hf, ours, back, copy):
        shutil.rmtree(path, ignore_errors=True)
    nbytes = synthetic_hf_checkpoint(hf, config)
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "convert.py")
    rows = {
        "bytes": nbytes,
        "largest_tensor_bytes": config.moe_num_experts
        * config.ffn_hidden_size
        * config.d_model
        * 2,
    }

    def run(direction, source, target):
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                script,
                f"--direction={direction}",
                f"--input={source}",
                f"--output={target}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        seconds = time.perf_counter() - start
        peak = float(re.search(r"peak RSS ([\d.]+) GiB", out).group(1))
        return {"s": seconds, "MB_per_s": nbytes / seconds / 1e6, "peak_rss_gib": peak}

    start = time.perf_counter()
    shutil.copytree(hf, copy)
    rows["copy"] = {"s": time.perf_counter() - start}
    rows["copy"]["MB_per_s"] = nbytes / rows["copy"]["s"] / 1e6
    shutil.rmtree(copy)
    rows["hf_to_jax"] = run("hf_to_jax", hf, ours)
    rows["jax_to_hf"] = run("jax_to_hf", ours, back)
    a, b = SafetensorsCheckpoint(hf), SafetensorsCheckpoint(back)
    rows["round_trip_bitwise"] = all(
        np.array_equal(a.get(n).view(np.uint16), b.get(n).view(np.uint16)) for n in a
    )
    if not keep:
        for path in (hf, ours, back):
            shutil.rmtree(path, ignore_errors=True)
    return rows


def generate_benchmark(
    config, batch: int, prompt_len: int, new_tokens: int, *, iters: int = 3
) -> dict[str, float]:
    """Prefill and decode tokens/s of `generate` on a random model (all new tokens are made:
    no stop ids). Decode time is the difference between `new_tokens` and 1 new token."""
    from flax import nnx

    from dbrx_jax.generate import generate
    from dbrx_jax.model import Dbrx

    model = Dbrx(config, rngs=nnx.Rngs(0))
    prompts = np.random.RandomState(0).randint(0, config.vocab_size, (batch, prompt_len))
    prompts = prompts.tolist()

    def run(n):
        return generate(model, prompts, max_new_tokens=n).tokens_BN

    prefill_s = time_call(run, 1, iters=iters)
    total_s = time_call(run, new_tokens, iters=iters)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "decode_step_s": decode_s / (new_tokens - 1),
    }


def hf_generate_benchmark(
    config, batch: int, prompt_len: int, new_tokens: int, *, iters: int = 3, dtype: str = "float32"
) -> dict[str, float]:
    """The same measurement for transformers' `generate` (greedy, KV cache). Needs torch."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _hf_model(config, device, dtype).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    prefill_s = time_call(run, 1, iters=iters)
    decode_s = max(time_call(run, new_tokens, iters=iters) - prefill_s, 1e-9)
    return {
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "device": device,
    }
