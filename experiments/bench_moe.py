"""MoE dispatch benchmark: forward and forward+backward of each implementation, with a plain
matmul of the same FLOPs as the ceiling, under balanced and skewed routing.

    python experiments/bench_moe.py                                   # dbrx-small shapes, CPU
    python experiments/bench_moe.py --tokens=8192 --d_model=6144 --ffn=10752 --dtype=bfloat16 \
        --impls=capacity,dropless:tokamax,dropless:ragged_dot         # the DBRX layer, GPU
"""

import json

import jax
from absl import app, flags, logging

from dbrx_jax import bench

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens in the batch (B * T).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_FFN = flags.DEFINE_integer("ffn", 448, "Expert hidden size F.")
_EXPERTS = flags.DEFINE_integer("experts", 16, "Number of experts E.")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token k.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMPLS = flags.DEFINE_list(
    "impls",
    ["dense", "dropless", "capacity"],
    "dense | capacity | dropless | dropless:<gmm_impl> (ragged_dot, tokamax, mgpu, megablox).",
)
_ROUTING = flags.DEFINE_list("routing", ["balanced", "skewed"], "balanced and/or skewed.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 1.0, "Capacity factor of the capacity path.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations (the median is reported).")
_JSON = flags.DEFINE_string("json_out", "bench_moe.json", "Where to write the results.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("devices: %s", jax.devices())
    setup = dict(
        tokens=_TOKENS.value,
        d_model=_D_MODEL.value,
        ffn=_FFN.value,
        num_experts=_EXPERTS.value,
        top_k=_TOP_K.value,
        dtype=_DTYPE.value,
        capacity_factor=_CAPACITY.value,
    )
    rows = bench.moe_benchmark(
        **setup, impls=_IMPLS.value, routings=_ROUTING.value, iters=_ITERS.value
    )
    print(f"{jax.devices()[0].device_kind}: {setup}")
    print(bench.format_table(rows))
    with open(_JSON.value, "w") as f:
        json.dump(
            {"device": jax.devices()[0].device_kind, "setup": setup, "rows": rows}, f, indent=2
        )


if __name__ == "__main__":
    app.run(main)
