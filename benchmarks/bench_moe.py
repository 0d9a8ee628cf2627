"""MoE dispatch benchmark: forward and forward+backward of each dispatch implementation on one
MoE layer of the --config's model (d_model, ffn_hidden_size, experts, top_k, activation, compute
dtype, capacity factor), with a plain matmul of the same FLOPs as the ceiling, under balanced and
skewed routing.

    python -m benchmarks.bench_moe                          # the dbrx-small layer, CPU
    python -m benchmarks.bench_moe --config=configs/bench.py:dbrx-132b \
        --config.model.dtype=bfloat16 --tokens=8192 \
        --impls=capacity,dropless:tokamax,dropless:ragged_dot   # the DBRX layer, GPU
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import cli, synthetic, timing
from dbrx_jax import DbrxConfig
from dbrx_jax.moe import dispatch, gmm
from dbrx_jax.moe.layer import ACTIVATIONS

_CONFIG = config_flags.DEFINE_config_file("config", cli.BENCH_CONFIG, "The layer's model.")
_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens in the batch (B * T).")
_IMPLS = flags.DEFINE_list(
    "impls",
    ["dense", "dropless", "capacity"],
    "dense | capacity | dropless (the platform's grouped GEMM) | dropless:<backend> "
    f"({', '.join(gmm.BACKENDS)}).",
)
_ROUTING = flags.DEFINE_list("routing", ["balanced", "skewed"], "balanced and/or skewed.")
flags.register_validator(
    "impls",
    lambda impls: all(_known_impl(impl) for impl in impls),
    "expected dense, capacity, dropless or dropless:<backend>, comma-separated",
)
flags.register_validator(
    "routing",
    lambda kinds: set(kinds) <= {"balanced", "skewed"},
    "expected balanced and/or skewed",
)
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations (the median is reported).")
_JSON = flags.DEFINE_string("json_out", "bench_moe.json", "Where to write the results.")


def _known_impl(impl: str) -> bool:
    dispatch_impl, _, backend = impl.partition(":")
    if dispatch_impl == "dropless":
        return not backend or backend in gmm.BACKENDS
    return dispatch_impl in dispatch.DISPATCHES and not backend


def grouped_matmul(impl: str) -> gmm.GroupedMatmul | None:
    """The grouped GEMM of an --impls entry: None but for dropless; plain dropless gets the
    platform's default backend; megablox runs in Pallas' interpreter off TPU."""
    if not _known_impl(impl):
        raise ValueError(f"MoE impl {impl!r}: expected dense, capacity, dropless[:<backend>]")
    dispatch_impl, _, backend = impl.partition(":")
    if dispatch_impl != "dropless":
        return None
    return gmm.for_platform(backend or "auto", jax.devices()[0].platform)


def moe_benchmark(
    config: DbrxConfig,
    *,
    tokens: int,
    impls: Sequence[str],
    routings: Sequence[str],
    iters: int = 5,
) -> list[dict]:
    """A row per (routing, impl) and one for the matmul ceiling: milliseconds and TFLOP/s of the
    forward and of forward+backward, and the fraction of assignments dropped.

    The backward is a VJP with a random cotangent: a `.sum()` loss would let XLA skip work."""
    M, D, F = tokens, config.d_model, config.ffn_hidden_size
    E, A, dt = config.moe_num_experts, config.moe_top_k, config.compute_dtype
    matmuls = {impl: grouped_matmul(impl) for impl in impls}
    rng = np.random.RandomState(0)
    x_MD = jnp.asarray(rng.randn(M, D), dt)
    w1_EDF, v1_EDF = (jnp.asarray(rng.randn(E, D, F) / D**0.5, dt) for _ in "wv")
    w2_EFD = jnp.asarray(rng.randn(E, F, D) / F**0.5, dt)
    g_MD = jnp.asarray(rng.randn(M, D), dt)
    flops_fwd = 2 * M * A * 3 * D * F

    lhs_RD = jnp.asarray(rng.randn(M * A, D), dt)
    rhs_DF = jnp.asarray(rng.randn(D, 3 * F), dt)
    g_RF = jnp.asarray(rng.randn(M * A, 3 * F), dt)
    matmul_vjp = jax.jit(lambda a, b, g: jax.vjp(jnp.matmul, a, b)[1](g))
    rows = [
        _row(
            "matmul (ceiling)",
            "-",
            timing.time_call(jax.jit(jnp.matmul), lhs_RD, rhs_DF, iters=iters),
            timing.time_call(matmul_vjp, lhs_RD, rhs_DF, g_RF, iters=iters),
            flops_fwd,
            0.0,
        )
    ]
    for kind in routings:
        ids_MA, weights_MA = map(jnp.asarray, synthetic.routing(kind, M, E, A))
        for impl, matmul in matmuls.items():

            def forward(x, weights, w1, v1, w2, ids=ids_MA, impl=impl, matmul=matmul):
                return dispatch.experts(
                    x,
                    ids,
                    weights,
                    w1,
                    v1,
                    w2,
                    act=ACTIVATIONS[config.ffn_act_fn],
                    impl=impl.partition(":")[0],
                    gmm=matmul,
                    capacity_factor=config.moe_capacity_factor,
                )

            fwd = jax.jit(forward)
            fwd_bwd = jax.jit(lambda args, g, f=forward: jax.vjp(lambda *a: f(*a)[0], *args)[1](g))
            args = (x_MD, weights_MA, w1_EDF, v1_EDF, w2_EFD)
            try:
                dropped = float(jnp.mean(fwd(*args)[1]))
                fwd_s = timing.time_call(fwd, *args, iters=iters)
                fwd_bwd_s = timing.time_call(fwd_bwd, args, g_MD, iters=iters)
            except Exception as error:  # one kernel that fails must not cost the other rows
                rows.append({"impl": impl, "routing": kind, "error": f"{error!r}"[:500]})
                continue
            rows.append(_row(impl, kind, fwd_s, fwd_bwd_s, flops_fwd, dropped))
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s", jax.devices())
    config = cli.model_config(_CONFIG.value)
    setup = {
        "preset": _CONFIG.value.model.preset,
        "tokens": _TOKENS.value,
        "d_model": config.d_model,
        "ffn": config.ffn_hidden_size,
        "num_experts": config.moe_num_experts,
        "top_k": config.moe_top_k,
        "act": config.ffn_act_fn,
        "dtype": config.dtype,
        "capacity_factor": config.moe_capacity_factor,
        "default_gmm": gmm.default_backend(jax.devices()[0].platform),
    }
    rows = moe_benchmark(
        config,
        tokens=_TOKENS.value,
        impls=_IMPLS.value,
        routings=_ROUTING.value,
        iters=_ITERS.value,
    )
    device = jax.devices()[0].device_kind
    print(f"{device}: {setup}")
    print(format_table(rows))
    with open(_JSON.value, "w") as f:
        json.dump({"device": device, "setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
