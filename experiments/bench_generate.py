"""Generation throughput: prefill and decode tokens/s at batch 1 and 16 for a preset, with
--compare_hf transformers' generate on the same config in a separate process of the same run,
and on accelerators the decode step's fraction of the memory-bandwidth roofline.

    python experiments/bench_generate.py --preset=dbrx-small --compare_hf          # CPU
    python experiments/bench_generate.py --preset=dbrx-bench --dtype=bfloat16 --compare_hf
"""

import json
import sys

import jax
from absl import app, flags

from dbrx_jax import DbrxConfig, bench, flops, metrics

_PRESET = flags.DEFINE_string("preset", "dbrx-small", "Model preset.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "New tokens.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute.")
_COMPARE_HF = flags.DEFINE_bool("compare_hf", False, "Also time transformers' generate.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = DbrxConfig.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    # transformers first: its own process, before this one's JAX takes the accelerator.
    hf = bench.run_hf_worker(__file__, sys.argv[1:]) if _COMPARE_HF.value else None
    rows = []
    for batch in map(int, _BATCHES.value):
        if _HF_WORKER.value:
            rows.append(
                bench.hf_generate_benchmark(
                    config, batch, _PROMPT.value, _NEW.value, dtype=_DTYPE.value
                )
            )
            continue
        row = bench.generate_benchmark(config, batch, _PROMPT.value, _NEW.value)
        bandwidth = metrics.peak_bandwidth()
        if bandwidth:
            step_bytes = flops.decode_bytes_per_step(
                config,
                batch,
                _PROMPT.value + _NEW.value // 2,
                2 if _DTYPE.value == "bfloat16" else 4,
            )
            row["roofline_fraction"] = step_bytes / row["decode_step_s"] / bandwidth
        rows.append(row)
    if _HF_WORKER.value:
        print(json.dumps(rows))
        return
    report = {"device": jax.devices()[0].device_kind, "preset": _PRESET.value, "ours": rows}
    if hf is not None:
        report["hf"] = hf
        report["decode_speedup"] = [
            o["decode_tokens_per_s"] / h["decode_tokens_per_s"]
            for o, h in zip(rows, report["hf"], strict=True)
        ]
    print(json.dumps(report, indent=2))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
