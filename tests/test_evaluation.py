"""The lm-eval backend (dbrx_jax/evaluation): a tiny random model with DBRX's vocabulary, exported
to the HF format, scored by our backend and by lm-eval's `hf` backend (transformers) gets the
same answers; the batched scoring equals the one-request reference; experiments/evaluate.py."""

import json
import os

import jax
import lm_eval.evaluator
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from benchmarks import synthetic
from dbrx_jax import DbrxConfig
from dbrx_jax.evaluation import harness, scoring
from dbrx_jax.io.checkpoint import export_params
from dbrx_jax.model import Dbrx
from tests import distributed_worker, helpers

MAX_SEQ_LEN = 96  # shorter than a KJV chapter: rolling windows and left truncation happen
TASK_LIMIT = 6


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may download; simple_evaluate's environment report (torch's collect_env) is
    left out."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)


def tiny_config(**changes) -> DbrxConfig:
    return DbrxConfig.preset(
        "dbrx-tiny",
        vocab_size=100352,
        max_seq_len=MAX_SEQ_LEN,
        eos_token_id=(100257, 100279),
        bos_token_id=100257,
        pad_token_id=100277,
        **changes,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return synthetic.random_hf_model(str(tmp_path_factory.mktemp("eval")), tiny_config())


@pytest.fixture(scope="module")
def ours(hf_dir):
    return harness.DbrxLM(hf_dir, batch_size=16)


@pytest.fixture(scope="module")
def theirs(hf_dir):
    return HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=16)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [
        Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=("test", i, 1))
        for i, a in enumerate(args)
    ]


def _assert_same_loglikelihoods(a, b, atol=1e-4):
    assert len(a) == len(b)
    for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b, strict=True):
        assert ll_a == pytest.approx(ll_b, rel=1e-6, abs=atol)  # sums of hundreds of terms
        assert greedy_a == greedy_b


# -- the fast path against its reference ----------------------------------------------------


def test_batched_scoring_equals_one_request_at_a_time():
    config = DbrxConfig.preset("dbrx-tiny", max_seq_len=64)
    model = Dbrx(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = [(5, 0), (5, 1), (30, 9), (70, 3), (9, 64), (40, 25), (90, 6)]
    requests = [
        (rng.integers(0, 512, c).tolist(), rng.integers(0, 512, n).tolist()) for c, n in lengths
    ]
    logits = model(jax.numpy.asarray([[5, 6, 7]])).logits[0, -1]
    requests.append(([5, 6, 7], [int(logits.argmax())]))  # greedy
    fast = scoring.score(model, requests, max_length=64, batch_size=8)
    reference = [scoring.score_one(model, c, x, 64) for c, x in requests]
    _assert_same_loglikelihoods(fast, reference, atol=2e-5)
    assert fast[0] == (0.0, True)  # an empty continuation
    assert fast[-1][1]


@pytest.mark.slow  # compiles a program per bucket
def test_bucketing_compiles_a_handful_of_programs():
    config = DbrxConfig.preset("dbrx-tiny", max_seq_len=128)
    model = Dbrx(config, rngs=nnx.Rngs(0))
    before = scoring._score_batch._cache_size()
    requests = [(list(range(1, n)), [1, 2]) for n in range(2, 120, 3)]
    scoring.score(model, requests, max_length=128, batch_size=4)
    # lengths 2..121 in 16, 32, 64, 128; one continuation bucket
    assert scoring._score_batch._cache_size() - before <= 4


def test_scoring_errors():
    config = DbrxConfig.preset("dbrx-tiny", max_seq_len=16)
    model = Dbrx(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="continuation of 17 tokens: expected at most"):
        scoring.score(model, [([1], list(range(17)))], max_length=16)
    with pytest.raises(ValueError, match="batch_size=0"):
        scoring.score(model, [([1], [2])], batch_size=0, max_length=16)


# -- against lm-eval's hf backend ------------------------------------------------------------


@pytest.mark.slow
def test_same_samples_and_metrics_as_the_hf_backend(ours, theirs):
    """Every request type of the KJV tasks: per-sample answers and the metrics table."""
    manager = harness.task_manager(["kjv"])
    options = dict(limit=TASK_LIMIT, log_samples=True, bootstrap_iters=0)
    results = [
        lm_eval.evaluator.simple_evaluate(model=lm, tasks=["kjv"], task_manager=manager, **options)
        for lm in (ours, theirs)
    ]
    for task in ("kjv_choice", "kjv_complete", "kjv_rolling"):
        samples = [r["samples"][task] for r in results]
        assert len(samples[0]) == len(samples[1]) == TASK_LIMIT
        for a, b in zip(*samples, strict=True):
            assert a["doc_id"] == b["doc_id"]
            for resp_a, resp_b in zip(a["resps"], b["resps"], strict=True):
                if task == "kjv_choice":
                    _assert_same_loglikelihoods(resp_a, resp_b)
                elif task == "kjv_complete":
                    assert resp_a == resp_b
                else:  # a chapter's total over its windows: hundreds of tokens
                    assert resp_a[0] == pytest.approx(resp_b[0], rel=1e-6, abs=1e-4)
        metrics = [r["results"][task] for r in results]
        for name, value in metrics[1].items():
            if isinstance(value, float):
                assert metrics[0][name] == pytest.approx(value, rel=1e-6), (task, name)


@pytest.mark.slow
def test_hard_requests_as_the_hf_backend(ours, theirs):
    long = " ".join(["And the LORD said unto Moses, Go in unto Pharaoh."] * 30)  # > the window
    args = [
        (long, " and tell him"),
        ("", "In the beginning God created"),  # empty context: the prefix token
        ("Psalms 23:1 The LORD is my shepherd; ", "I shall not want."),  # trailing space
        ("Genesis 1:3 And God said,", " Let there be light"),
        ("x", " " + long[:300]),  # the continuation fills most of the window
    ]
    requests = _requests("loglikelihood", args)
    _assert_same_loglikelihoods(ours.loglikelihood(requests), theirs.loglikelihood(requests))
    assert len(ours.tok_encode(long)) > MAX_SEQ_LEN
    assert MAX_SEQ_LEN / 2 < len(ours.tok_encode(" " + long[:300])) < MAX_SEQ_LEN
    # A continuation longer than the window cannot be scored (the hf backend asserts).
    with pytest.raises(ValueError, match=r"continuation of \d+ tokens: expected at most"):
        ours.loglikelihood(_requests("loglikelihood", [("x", " " + long)]))


@pytest.mark.slow
def test_empty_continuation_scores_zero(ours):
    answers = ours.loglikelihood(_requests("loglikelihood", [("Amen.", ""), ("", "")]))
    assert answers == [(0.0, True), (0.0, True)]


@pytest.mark.slow
def test_generation_as_the_hf_backend(ours, theirs):
    """A stop string that never appears (the full max_gen_toks), stop strings that do, and a
    prompt longer than the window (left-truncated to max_length - max_gen_toks)."""
    never = {"until": ["NEVER_APPEARS"], "max_gen_toks": 12, "do_sample": False}
    common = {"until": [" ", "e"], "max_gen_toks": 16}
    args = [
        ("Genesis 1:1 In the beginning", never),
        ("Psalms 23:1 The LORD", never),
        (" ".join(["Let there be light."] * 40), never),
        ("John 1:1 In the beginning was the Word,", common),
        ("John 11:35", common),
    ]
    requests = _requests("generate_until", args)
    answers = ours.generate_until(requests)
    assert answers == theirs.generate_until(requests)
    assert all(answers[:3])
    full = ours.tok_encode(answers[0])
    assert 10 <= len(full) <= 12  # all of max_gen_toks (specials dropped, text re-encoded)


@pytest.mark.slow
def test_mixed_batches_equal_one_request_at_a_time(hf_dir, ours):
    single = harness.DbrxLM(hf_dir, batch_size=1)
    lines = [
        ("Genesis 1:1", " In the beginning"),
        ("A much longer context that goes on " * 6, " and on"),
        ("Psalms 1:1 Blessed is the man", " that walketh not in the counsel of the ungodly"),
        ("x", " y"),
    ]
    requests = _requests("loglikelihood", lines)
    _assert_same_loglikelihoods(ours.loglikelihood(requests), single.loglikelihood(requests), 2e-5)
    gen = _requests("generate_until", [(c, {"until": ["."], "max_gen_toks": 8}) for c, _ in lines])
    assert ours.generate_until(gen) == single.generate_until(gen)


@pytest.mark.slow
def test_chat_template_as_the_hf_tokenizer(ours, theirs):
    history = [
        {"role": "system", "content": "You quote the King James Bible."},
        {"role": "user", "content": "Genesis 1:1?"},
        {"role": "assistant", "content": "In the beginning"},
    ]
    for generation_prompt in (True, False):
        messages = history[:-1] if generation_prompt else history
        assert ours.apply_chat_template(messages, generation_prompt) == theirs.apply_chat_template(
            messages, generation_prompt
        )
    assert ours.apply_chat_template(history[1:2]) == theirs.apply_chat_template(history[1:2])


@pytest.mark.slow
def test_sharded_model_gives_the_same_answers(hf_dir, ours):
    sharded = harness.DbrxLM(hf_dir, batch_size=8, mesh="expert=4,tensor=2")
    requests = _requests(
        "loglikelihood", [("Genesis 1:1", " In the beginning"), ("Amen", " and amen.")]
    )
    _assert_same_loglikelihoods(sharded.loglikelihood(requests), ours.loglikelihood(requests), 2e-5)


@pytest.mark.slow
def test_two_processes_score_and_generate_as_one(tmp_path):
    """A model spread over 2 processes x 4 devices (one SPMD program, as on many hosts): every
    process gets the answers one process of 8 devices gets."""
    config = DbrxConfig.preset("dbrx-tiny", max_seq_len=64)
    export = str(tmp_path / "export")
    export_params(nnx.state(Dbrx(config, rngs=nnx.Rngs(0)), nnx.Param), config, export)
    answers, tokens = distributed_worker.score_and_generate(export)  # one process, 8 devices
    worker = ("tests/distributed_worker.py", "--job=eval", f"--export={export}")
    for result in helpers.run_processes(*worker):
        assert result["tokens"] == tokens
        _assert_same_loglikelihoods(result["answers"], answers, atol=1e-5)


def test_backend_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="batch_size='x': expected a positive int"):
        harness.DbrxLM(str(tmp_path), batch_size="x")  # before the (missing) model is read
    with pytest.raises(ValueError, match="max_length=0: expected a positive int"):
        harness.DbrxLM(str(tmp_path), max_length=0)


@pytest.mark.slow  # lm-eval indexes its own thousands of tasks before giving up on a name
def test_unknown_task():
    with pytest.raises(ValueError, match="--tasks: no task or group named 'no_such_task'"):
        harness.task_manager(["kjv_choice", "no_such_task"])


@pytest.mark.slow
def test_unsupported_generation_argument(ours):
    request = _requests("generate_until", [("Amen", {"until": ["."], "num_beams": 4})])
    with pytest.raises(ValueError, match=r"generation kwargs \['num_beams'\]: not supported"):
        ours.generate_until(request)


# -- experiments/evaluate.py -----------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_experiment(hf_dir, tmp_path):
    out = tmp_path / "scores.json"
    result = helpers.run(
        "experiments/evaluate.py",
        f"--checkpoint={hf_dir}",
        "--tasks=kjv_choice,kjv_complete",
        "--limit=3",
        "--batch_size=4",
        f"--output_json={out}",
        f"--compilation_cache_dir={tmp_path / 'xla'}",
    )
    assert "kjv_choice" in result.stdout and "acc_norm" in result.stdout
    scores = json.loads(out.read_text())
    assert set(scores["results"]) == {"kjv_choice", "kjv_complete"}
    assert sorted(os.listdir(tmp_path)) == ["scores.json", "xla"]  # nothing half-written
    assert os.listdir(tmp_path / "xla")  # the compiled programs, for the next run


@pytest.mark.slow
def test_evaluate_experiment_errors(tmp_path):
    result = helpers.run(
        "experiments/evaluate.py",
        f"--checkpoint={tmp_path}",
        "--tasks=no_such_task",
        check=False,
    )
    assert result.returncode != 0
    assert "--tasks: no task or group named 'no_such_task'" in result.stderr
    result = helpers.run(
        "experiments/evaluate.py",
        f"--checkpoint={tmp_path}",
        "--tasks=kjv",
        "--limit=1.5",
        check=False,
    )
    assert "--limit=1.5: expected a count >= 1 or a fraction in (0, 1)" in result.stderr
