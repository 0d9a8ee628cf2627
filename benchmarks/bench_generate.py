"""Generation throughput: prefill and decode tokens/s of the --config's model (its compute and
parameter dtypes) at each of --batches, with --compare_hf transformers' `generate` on the same
config in a separate process of the same run, and on accelerators the decode step's fraction of
the memory-bandwidth roofline.

    python -m benchmarks.bench_generate --compare_hf                     # dbrx-small, CPU
    python -m benchmarks.bench_generate --config=configs/bench.py:dbrx-bench \
        --config.model.param_dtype=bfloat16 --batches=1 --compare_hf    # one GPU
"""

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import cli, timing
from dbrx_jax import DbrxConfig, flops

_CONFIG = config_flags.DEFINE_config_file("config", cli.BENCH_CONFIG, "Benchmark config.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens.")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "Also time transformers' generate.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")


def roofline_fraction(config: DbrxConfig, row: dict) -> float | None:
    """The bytes a decode step must read (at the middle of generation) over its time, as a
    fraction of the device's memory bandwidth; None where the bandwidth is unknown (CPUs)."""
    bandwidth = flops.peak_bandwidth()
    if not bandwidth:
        return None
    context = row["prompt_len"] + row["new_tokens"] // 2
    step_bytes = flops.decode_bytes_per_step(
        config, row["batch"], context, config.weight_dtype.itemsize
    )
    return step_bytes / row["decode_step_s"] / bandwidth


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = cli.model_config(_CONFIG.value)
    batches = [int(b) for b in _BATCHES.value]
    if _HF_WORKER.value:
        from benchmarks import hf_timing  # torch: only the transformers process imports it

        rows = [
            hf_timing.hf_generate_benchmark(config, b, _PROMPT.value, _NEW.value) for b in batches
        ]
        print(json.dumps(rows))
        return
    hf = None
    if _COMPARE_HF.value:  # transformers first, before this process' JAX takes the accelerator
        hf = cli.run_worker("benchmarks.bench_generate", sys.argv[1:])
    logging.info("devices: %s", jax.devices())
    rows = []
    for batch in batches:
        row = timing.generate_benchmark(config, batch, _PROMPT.value, _NEW.value)
        fraction = roofline_fraction(config, row)
        rows.append(row if fraction is None else {**row, "roofline_fraction": fraction})
    report = {
        "device": jax.devices()[0].device_kind,
        "preset": _CONFIG.value.model.preset,
        "dtype": config.dtype,
        "param_dtype": config.param_dtype,
        "ours": rows,
    }
    if hf is not None:
        report["hf"] = hf
        report["decode_speedup"] = [
            o["decode_tokens_per_s"] / h["decode_tokens_per_s"]
            for o, h in zip(rows, hf, strict=True)
        ]
    cli.write_report(report, _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
