"""Training-step throughput: tokens/s, model TFLOP/s and MFU of our full step (forward,
backward, AdamW; fp32 master weights, --dtype compute) for a preset, compile time and memory,
with --profile_steps where the step's time goes (attention, expert GEMMs, routing and
permutation, optimizer, ...), and with --compare_hf the transformers PyTorch step on the same
config, measured in a separate process of the same run.

    python experiments/bench_train.py --preset=dbrx-small --batch_size=8 --seq_len=128 \
        --compare_hf --profile_steps=2                                 # CPU
    python experiments/bench_train.py --preset=dbrx-bench --batch_size=4 --seq_len=2048 \
        --dtype=bfloat16 --attention_impl=cudnn --gmm_impl=mgpu --fuse_gate_up \
        --profile_steps=3 --compare_hf                                 # one GPU
"""

import json
import sys

from absl import app, flags

from dbrx_jax import DbrxConfig, bench, sharding, summary
from dbrx_jax.config import (
    ATTENTION_IMPLS,
    GMM_IMPLS,
    MOE_EXCHANGES,
    MOE_IMPLS,
    REMAT_POLICIES,
)

_PRESET = flags.DEFINE_string("preset", "dbrx-small", "Model preset.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh axis sizes, e.g. data=2,expert=4.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps (median).")
_ATTENTION = flags.DEFINE_enum("attention_impl", "xla", ATTENTION_IMPLS, "Attention kernel.")
_MOE = flags.DEFINE_enum("moe_impl", "auto", MOE_IMPLS, "MoE dispatch.")
_GMM = flags.DEFINE_enum("gmm_impl", "auto", GMM_IMPLS, "Grouped GEMM of the dropless path.")
_REMAT = flags.DEFINE_enum("remat_policy", "none", REMAT_POLICIES, "Per-block remat policy.")
_FUSE = flags.DEFINE_bool("fuse_gate_up", False, "One [E, D, 2F] GEMM for w1 and v1.")
_EXCHANGE = flags.DEFINE_enum("moe_exchange", "all_gather", MOE_EXCHANGES, "Expert exchange.")
_PROFILE = flags.DEFINE_integer("profile_steps", 0, "Trace this many steps for a breakdown.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the profiler trace here.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "Also time transformers' step.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = DbrxConfig.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype="float32")
    knobs = dict(
        attention_impl=_ATTENTION.value,
        moe_impl=_MOE.value,
        gmm_impl=_GMM.value,
        remat_policy=_REMAT.value,
        moe_fuse_gate_up=_FUSE.value,
        moe_exchange=_EXCHANGE.value,
    )
    if _HF_WORKER.value:
        row = bench.hf_train_step_benchmark(
            config, _BATCH.value, _SEQ.value, iters=_ITERS.value, dtype=_DTYPE.value
        )
        print(json.dumps(row))
        return
    # transformers first: its own process, before this one's JAX takes the accelerator.
    hf = bench.run_hf_worker(__file__, sys.argv[1:]) if _COMPARE_HF.value else None
    sizes = sharding.parse_mesh(_MESH.value)
    report = summary.train_report(
        config.replace(**knobs),
        sharding.make_mesh(sizes),
        _BATCH.value,
        _SEQ.value,
        iters=_ITERS.value,
        profile_steps=_PROFILE.value,
        trace_dir=_TRACE_DIR.value,
        hf=hf,
    )
    report.update(preset=_PRESET.value, dtype=_DTYPE.value, knobs=knobs)
    print(json.dumps(report, indent=2))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
