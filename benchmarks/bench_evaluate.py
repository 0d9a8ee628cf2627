"""Requests per second of the lm-eval backends on one checkpoint: ours (dbrx_jax/evaluation)
against lm-eval's `hf` backend (transformers on PyTorch), in a separate process of the same run,
for each request type, on the same requests (our KJV tasks'); with how far their answers differ.

    python -m benchmarks.bench_evaluate                      # a random dbrx-small, DBRX's vocab
    python -m benchmarks.bench_evaluate --hf_dir=<HF directory> --batch_size=16 --limit=100

Each backend answers every request type `--passes` times; the first pass includes our
compilation (a program per length bucket), the last is the steady state the speedup is taken
from. Without --hf_dir a model of --preset with DBRX's vocabulary is initialised at random and
exported (tokenizer files included) to a temporary directory.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags

from benchmarks import cli, synthetic
from dbrx_jax import DbrxConfig
from dbrx_jax.evaluation import harness

_HF_DIR = flags.DEFINE_string("hf_dir", None, "An HF directory (default: a random model).")
_PRESET = flags.DEFINE_string("preset", "dbrx-small", "The random model's preset.")
_SEQ = flags.DEFINE_integer("max_seq_len", 512, "The random model's context window.")
_TASKS = flags.DEFINE_list("tasks", ["kjv_choice", "kjv_rolling", "kjv_complete"], "Tasks.")
_LIMIT = flags.DEFINE_integer("limit", 64, "Docs per task.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Requests per forward (both backends).")
_PASSES = flags.DEFINE_integer("passes", 2, "Times each backend answers the requests.")
_HF_WORKER = flags.DEFINE_bool("hf_worker", False, "Internal: be the transformers process.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")


def time_backend(lm, requests: dict) -> dict:
    """{request type: {"seconds": [per pass], "answers": last pass's}}."""
    report = {}
    for kind, instances in requests.items():
        seconds = []
        for _ in range(_PASSES.value):
            start = time.perf_counter()
            answers = getattr(lm, kind)(instances, disable_tqdm=True)
            seconds.append(time.perf_counter() - start)
        report[kind] = {"requests": len(instances), "seconds": seconds, "answers": answers}
    return report


def backend(hf_dir: str):
    if _HF_WORKER.value:
        from lm_eval.models.huggingface import HFLM  # torch: only the worker process loads it

        return HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=_BATCH.value)
    return harness.DbrxLM(hf_dir, batch_size=_BATCH.value)


def differences(kind: str, ours: list, theirs: list) -> dict:
    if kind == "generate_until":
        return {"same_text": sum(a == b for a, b in zip(ours, theirs, strict=True))}
    if kind == "loglikelihood":
        ours_ll, theirs_ll = [a[0] for a in ours], [b[0] for b in theirs]
        greedy = sum(a[1] == b[1] for a, b in zip(ours, theirs, strict=True))
        extra = {"same_greedy": greedy}
    else:
        ours_ll, theirs_ll, extra = ours, theirs, {}
    gap = max(abs(a - b) for a, b in zip(ours_ll, theirs_ll, strict=True))
    return {"max_abs_loglikelihood_diff": gap, **extra}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = _HF_DIR.value
        if hf_dir is None and not _HF_WORKER.value:
            config = DbrxConfig.preset(
                _PRESET.value,
                vocab_size=100352,
                max_seq_len=_SEQ.value,
                eos_token_id=(100257, 100279),
            )
            hf_dir = synthetic.random_hf_model(tmp, config)
        manager = harness.task_manager(_TASKS.value)
        requests = harness.task_requests(_TASKS.value, manager, _LIMIT.value)
        if _HF_WORKER.value:
            print(json.dumps(time_backend(backend(hf_dir), requests), default=list))
            return
        theirs = cli.run_worker("benchmarks.bench_evaluate", [*sys.argv[1:], f"--hf_dir={hf_dir}"])
        ours = time_backend(backend(hf_dir), requests)
    report = {"batch_size": _BATCH.value, "hf_dir": _HF_DIR.value or f"random {_PRESET.value}"}
    for kind, row in ours.items():
        hf_row = theirs[kind]
        report[kind] = {
            "requests": row["requests"],
            "ours_s": row["seconds"],
            "hf_s": hf_row["seconds"],
            "ours_req_per_s": row["requests"] / row["seconds"][-1],
            "hf_req_per_s": row["requests"] / hf_row["seconds"][-1],
            "speedup": hf_row["seconds"][-1] / row["seconds"][-1],
            **differences(kind, row["answers"], hf_row["answers"]),
        }
    cli.write_report(report, _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
