"""Score a checkpoint with lm-evaluation-harness, offline, through our JAX backend
(dbrx_jax/evaluation/harness.py): no PyTorch, the same answers as lm-eval's `hf` backend.

    python experiments/evaluate.py --checkpoint=runs/demo-export --tasks=kjv
    python experiments/evaluate.py --checkpoint=hf/dbrx-instruct --tasks=kjv_complete \
        --apply_chat_template --mesh=tensor=8 --output_json=scores.json
    python experiments/evaluate.py --checkpoint=runs/demo-export --adapters=runs/sft \
        --tasks=my_task --include_path=my_tasks/ --num_fewshot=5 --limit=100

Our KJV tasks (kjv, kjv_choice, kjv_complete, kjv_rolling) are always available; any other task
folder comes in with --include_path. Needs the `eval` extra (pip install -e .[eval]).
"""

import os

# Tasks read local files: never reach for the Hub (set before lm-eval and datasets load).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
from absl import app, flags

from dbrx_jax import cli
from dbrx_jax.evaluation import harness

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Our export or an HF directory (with --adapters: the base).", required=True
)
_ADAPTERS = flags.DEFINE_string("adapters", "", "A LoRA run's workdir: its adapters on the base.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "dbrx, hf:<dir>, or a sentencepiece file.")
_TASKS = flags.DEFINE_list("tasks", None, "Task or group names, comma-separated.", required=True)
_INCLUDE_PATH = flags.DEFINE_multi_string("include_path", [], "Folders of task YAMLs (repeat).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
_LIMIT = flags.DEFINE_float("limit", None, "Docs per task: a count, or a fraction if below 1.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Requests per forward.", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context window (default: max_seq_len).")
_MESH = flags.DEFINE_string("mesh", "", "Shard the model, e.g. tensor=8 or expert=4,tensor=2.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: the checkpoint's).")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Prompts in DBRX's ChatML.")
_SYSTEM = flags.DEFINE_string("system_instruction", None, "A system message for every prompt.")
_GEN_KWARGS = flags.DEFINE_string("gen_kwargs", None, "e.g. temperature=0.7,do_sample=True")
_SEED = flags.DEFINE_integer("seed", 0, "Few-shot sampling and generation seed.")
_LOG_SAMPLES = flags.DEFINE_bool("log_samples", False, "Keep every sample in --output_json.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write lm-eval's results dict here.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "Keep XLA's programs here: a rerun skips their compilation."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    limit = _LIMIT.value
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise app.UsageError(f"--limit={limit}: expected a count >= 1 or a fraction in (0, 1)")
    out_dir = os.path.dirname(os.path.abspath(_OUTPUT_JSON.value or "."))
    if _OUTPUT_JSON.value and not os.path.isdir(out_dir):
        raise app.UsageError(f"--output_json={_OUTPUT_JSON.value}: no directory {out_dir}")
    manager = harness.task_manager(_TASKS.value, _INCLUDE_PATH.value)  # before the model loads
    if _CACHE.value:  # one program per shape bucket, a couple of seconds each on a CPU
        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    lm = harness.DbrxLM(
        _CHECKPOINT.value,
        adapters=_ADAPTERS.value,
        tokenizer=_TOKENIZER.value,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
        mesh=_MESH.value,
        dtype=_DTYPE.value,
        seed=_SEED.value,
    )
    results = harness.evaluate(
        lm,
        _TASKS.value,
        manager,
        num_fewshot=_NUM_FEWSHOT.value,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        apply_chat_template=_CHAT.value,
        system_instruction=_SYSTEM.value,
        gen_kwargs=_GEN_KWARGS.value,
        log_samples=_LOG_SAMPLES.value,
        random_seed=_SEED.value,
        numpy_random_seed=_SEED.value,
        fewshot_random_seed=_SEED.value,
    )
    if results is None:  # not lm-eval's rank 0
        return
    print(harness.make_table(results))
    if _OUTPUT_JSON.value:
        harness.write_results(results, _OUTPUT_JSON.value)


if __name__ == "__main__":
    cli.run(main)
