"""Training-step throughput: tokens/s and MFU of our full step (forward, backward, AdamW) for a
preset, and with --compare_hf the transformers PyTorch step on the same config, measured in a
separate process of the same run.

    python experiments/bench_train.py --preset=dbrx-small --batch_size=8 --seq_len=128 \
        --compare_hf                                                   # CPU
    python experiments/bench_train.py --preset=dbrx-bench --batch_size=4 --seq_len=2048 \
        --dtype=bfloat16 --compare_hf                                  # one GPU
"""

import json
import subprocess
import sys

import jax
from absl import app, flags

from dbrx_jax import DbrxConfig, bench, flops, metrics, sharding, summary

_PRESET = flags.DEFINE_string("preset", "dbrx-small", "Model preset.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "data=-1", "Mesh axis sizes, e.g. data=2,expert=4.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps (median).")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "Also time transformers' step.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = DbrxConfig.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype="float32")
    if _HF_WORKER.value:
        row = bench.hf_train_step_benchmark(
            config, _BATCH.value, _SEQ.value, iters=_ITERS.value, dtype=_DTYPE.value
        )
        print(json.dumps(row))
        return
    sizes = {k: int(v) for k, v in (item.split("=") for item in _MESH.value.split(","))}
    ours = summary.time_train_step(
        config, sharding.make_mesh(sizes), _BATCH.value, _SEQ.value, iters=_ITERS.value
    )
    flops_per_s = flops.train_flops_per_token(config, _SEQ.value) * ours["tokens_per_s"]
    peak = metrics.peak_flops()
    report = {
        "device": jax.devices()[0].device_kind,
        "preset": _PRESET.value,
        "batch": _BATCH.value,
        "seq_len": _SEQ.value,
        "dtype": _DTYPE.value,
        "ours": {
            **ours,
            "model_tflops": flops_per_s / 1e12,
            "mfu": flops_per_s / (peak * jax.device_count()) if peak else None,
        },
    }
    if _COMPARE_HF.value:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--hf_worker",
                *argv[1:],
                *(a for a in sys.argv[1:] if a != "--compare_hf"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        hf = json.loads(out.stdout.strip().splitlines()[-1])
        hf["mfu"] = (
            (flops.train_flops_per_token(config, _SEQ.value) * hf["tokens_per_s"] / peak)
            if peak
            else None
        )
        report["hf"] = hf
        report["speedup"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
