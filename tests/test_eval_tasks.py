"""The KJV lm-eval task set (dbrx_jax/evaluation/tasks/kjv): its three tasks and group load
offline through lm-eval's TaskManager, send the requests they should, and score a fake model
the way its answers imply; its data is what make_data.py writes."""

import collections
import json
import math
import os
import re

import lm_eval.evaluator
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from dbrx_jax.evaluation import TASKS_DIR
from dbrx_jax.evaluation.tasks.kjv import make_data

KJV_DIR = os.path.join(TASKS_DIR, "kjv")
DATA_FILES = ("verses_test.jsonl", "verses_train.jsonl", "chapters_test.jsonl")
TASKS = ("kjv_choice", "kjv_complete", "kjv_rolling")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may download; and simple_evaluate's environment report (it imports torch and
    transformers and runs torch's collect_env: seconds) is left out."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)


def _docs(name: str) -> list[dict]:
    with open(os.path.join(KJV_DIR, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _garbled(rest: str, verse: int) -> str:
    """The non-oracle's completion: lower case (odd verses) or without its final punctuation."""
    return rest.lower() if verse % 2 else rest.rstrip(".,;:?!")


class FakeLM(LM):
    """Answers from the request's document. The oracle gives the true ending log-likelihood 0
    and generates the true rest; otherwise an ending's log-likelihood is minus its length in
    characters (acc: the shortest ending wins; acc_norm: all tie, the first wins) and the rest
    comes back `_garbled`. A text costs one bit a byte. Requests are kept by type."""

    def __init__(self, oracle: bool):
        super().__init__()
        self.oracle = oracle
        self.requests = collections.defaultdict(list)

    def loglikelihood(self, requests):
        self.requests["loglikelihood"] += requests
        results = []
        for r in requests:
            _, continuation = r.args
            true = r.doc["endings"][r.doc["label"]]
            results.append(
                (0.0 if self.oracle and continuation == true else -float(len(continuation)), False)
            )
        return results

    def loglikelihood_rolling(self, requests):
        self.requests["loglikelihood_rolling"] += requests
        return [-len(r.args[0].encode()) * math.log(2) for r in requests]

    def generate_until(self, requests):
        self.requests["generate_until"] += requests
        rest = [r.doc["rest"] for r in requests]
        if not self.oracle:
            rest = [_garbled(text, r.doc["verse"]) for text, r in zip(rest, requests, strict=True)]
        return [" " + text for text in rest]  # a model's leading space


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_path=TASKS_DIR, include_defaults=False)


def _evaluate(manager, lm, **kwargs):
    return lm_eval.evaluator.simple_evaluate(
        model=lm,
        tasks=["kjv"],
        task_manager=manager,
        bootstrap_iters=0,
        torch_random_seed=None,
        log_samples=False,
        **kwargs,
    )


def test_the_tasks_and_the_group_load(manager):
    assert set(manager.all_subtasks) == set(TASKS)
    assert manager.all_groups == ["kjv"]
    loaded = manager.load("kjv")
    assert loaded["group_map"] == {"kjv": list(TASKS)}
    tasks = loaded["tasks"]
    assert [tasks[t].OUTPUT_TYPE for t in TASKS] == [
        "multiple_choice",
        "generate_until",
        "loglikelihood_rolling",
    ]
    assert [len(tasks[t].test_docs()) for t in TASKS] == [100, 100, 16]
    assert [len(tasks[t].fewshot_docs()) for t in TASKS[:2]] == [10, 10]
    assert tasks["kjv_complete"].config.generation_kwargs == {
        "until": ["\n"],
        "max_gen_toks": 48,
        "do_sample": False,
    }


def test_the_data_is_what_the_generator_writes(tmp_path):
    assert sorted(os.path.basename(p) for p in make_data.main(str(tmp_path))) == sorted(DATA_FILES)
    for name in DATA_FILES:
        assert (tmp_path / name).read_bytes() == open(os.path.join(KJV_DIR, name), "rb").read()


def test_the_data_is_cut_from_verses_away_from_genesis():
    test, train = _docs("verses_test.jsonl"), _docs("verses_train.jsonl")
    assert not {d["citation"] for d in test} & {d["citation"] for d in train}
    for d in test + train:
        assert d["book"] in ("Psalms", "Proverbs", "John")
        assert d["prompt"].startswith(d["citation"] + " ") and not d["prompt"].endswith(" ")
        assert len(d["endings"]) == len(set(d["endings"])) == 4
        assert all(e.startswith(" ") and not e.startswith("  ") for e in d["endings"])
        assert d["endings"][d["label"]] == " " + d["rest"]
    assert len({d["label"] for d in test}) == 4
    for d in _docs("chapters_test.jsonl"):
        assert d["book"] in ("Psalms", "Proverbs", "John")
        assert d["text"].startswith(f"{d['book']} {d['chapter']}\n")


def test_an_oracle_scores_perfectly_from_any_directory(manager, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the data is found next to the loader, not here
    lm = FakeLM(oracle=True)
    out = _evaluate(manager, lm)
    results = out["results"]
    assert {t: out["n-shot"][t] for t in TASKS} == {t: 0 for t in TASKS}
    assert results["kjv_choice"]["acc,none"] == results["kjv_choice"]["acc_norm,none"] == 1.0
    assert results["kjv_complete"]["exact_match,none"] == 1.0
    texts = [d["text"] for d in _docs("chapters_test.jsonl")]
    num_bytes = sum(len(t.encode()) for t in texts)
    num_words = sum(len(re.split(r"\s+", t)) for t in texts)
    rolling = results["kjv_rolling"]
    assert rolling["bits_per_byte,none"] == pytest.approx(1.0)
    assert rolling["byte_perplexity,none"] == pytest.approx(2.0)
    assert rolling["word_perplexity,none"] == pytest.approx(2.0 ** (num_bytes / num_words))

    # The requests: 4 endings a verse, joined to the prompt by their own single space; the
    # prompt alone to generate from; a whole chapter to score.
    verses = _docs("verses_test.jsonl")
    choice = lm.requests["loglikelihood"]
    assert len(choice) == 400 and {r.request_type for r in choice} == {"loglikelihood"}
    assert {(d["prompt"], e) for d in verses for e in d["endings"]} == {r.args for r in choice}
    generate = lm.requests["generate_until"]
    assert sorted(r.args[0] for r in generate) == sorted(d["prompt"] for d in verses)
    assert all(r.args[1]["until"] == ["\n"] and r.args[1]["max_gen_toks"] == 48 for r in generate)
    rolling = lm.requests["loglikelihood_rolling"]
    assert sorted(r.args for r in rolling) == sorted((t,) for t in texts)


def test_two_shots_and_the_scores_a_fake_implies(manager):
    lm = FakeLM(oracle=False)
    out = _evaluate(manager, lm, num_fewshot=2)
    n_shot = {t: out["n-shot"][t] for t in TASKS}
    assert n_shot == {"kjv_choice": 2, "kjv_complete": 2, "kjv_rolling": 0}
    verses = _docs("verses_test.jsonl")
    shortest = [
        min(range(4), key=lambda i, d=d: (len(d["endings"][i]), i)) == d["label"] for d in verses
    ]
    results = out["results"]
    assert results["kjv_choice"]["acc,none"] == pytest.approx(sum(shortest) / 100)
    assert results["kjv_choice"]["acc_norm,none"] == pytest.approx(
        sum(d["label"] == 0 for d in verses) / 100
    )
    # Case and punctuation count: only the completions that `_garbled` left unchanged match.
    unchanged = sum(_garbled(d["rest"], d["verse"]) == d["rest"] for d in verses)
    assert 0 < unchanged < 50
    assert results["kjv_complete"]["exact_match,none"] == pytest.approx(unchanged / 100)

    # Each context: two few-shot examples ("prompt rest"), then the prompt.
    examples = {f"{d['prompt']} {d['rest']}" for d in _docs("verses_train.jsonl")}
    requests = lm.requests["loglikelihood"] + lm.requests["generate_until"]
    assert len(requests) == 500
    for r in requests:
        *shots, prompt = r.args[0].split("\n\n")
        assert len(shots) == 2 and set(shots) <= examples
        assert prompt == r.doc["prompt"]
    assert len(lm.requests["loglikelihood_rolling"]) == 16
