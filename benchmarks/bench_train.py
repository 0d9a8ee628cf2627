"""Training-step throughput: tokens/s, model TFLOP/s and MFU of our full step (forward, backward,
AdamW) on the --config's model, batch and mesh, its compile time and memory; with
--profile_steps where the step's time goes (attention, expert GEMMs, routing and permutation,
optimizer, ...), and with --compare_hf transformers' PyTorch step on the same config (in the
config's compute dtype), measured in a separate process of the same run.

    python -m benchmarks.bench_train --compare_hf --profile_steps=2      # dbrx-small, CPU
    python -m benchmarks.bench_train --config=configs/bench.py:dbrx-bench \
        --config.batch_size=4 --config.seq_len=2048 --config.model.attention_impl=cudnn \
        --config.model.moe_gmm_impl=mgpu --config.model.moe_fuse_gate_up=True \
        --profile_steps=3 --compare_hf                                   # one GPU
"""

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import cli, timing
from dbrx_jax import sharding

# The execution knobs of the model config that the report records.
KNOBS = (
    "dtype",
    "param_dtype",
    "attention_impl",
    "moe_impl",
    "moe_gmm_impl",
    "moe_exchange",
    "moe_fuse_gate_up",
    "remat_policy",
    "scan_unroll",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.BENCH_CONFIG, "Benchmark config: model, batch_size, seq_len, mesh."
)
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps (median).")
_PROFILE = flags.DEFINE_integer("profile_steps", 0, "Trace this many steps for a breakdown.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the profiler trace here.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "Also time transformers' step.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    model = cli.model_config(config)
    if _HF_WORKER.value:
        from benchmarks import hf_timing  # torch: only the transformers process imports it

        row = hf_timing.hf_train_step_benchmark(
            model, config.batch_size, config.seq_len, iters=_ITERS.value
        )
        print(json.dumps(row))
        return
    hf = None
    if _COMPARE_HF.value:  # transformers first, before this process' JAX takes the accelerator
        hf = cli.run_worker("benchmarks.bench_train", sys.argv[1:])
    logging.info("devices: %s; processes: %d", jax.devices(), jax.process_count())
    report = timing.train_report(
        model,
        sharding.make_mesh(dict(config.mesh)),
        config.batch_size,
        config.seq_len,
        iters=_ITERS.value,
        profile_steps=_PROFILE.value,
        trace_dir=_TRACE_DIR.value,
        hf=hf,
    )
    report.update(preset=config.model.preset, knobs={k: getattr(model, k) for k in KNOBS})
    cli.write_report(report, _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
