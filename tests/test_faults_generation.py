"""Generation refuses what it would answer with nonsense (wrapped ids, NaN embeddings, zeros) or
fail on deep inside JAX: each bad argument is a one-line ValueError that names it, raised before
anything is compiled. The entry point exits non-zero naming the flag."""

import math

import numpy as np
import pytest
from flax import nnx

from dbrx_jax import DbrxConfig
from dbrx_jax import generate as gen
from dbrx_jax.io import checkpoint
from dbrx_jax.model import Dbrx
from tests import helpers

CONFIG = DbrxConfig.preset("dbrx-tiny", vocab_size=128, n_layers=1, max_seq_len=32)


@pytest.fixture(scope="module")
def tiny_model():
    return Dbrx(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture
def model(tiny_model, monkeypatch):
    """The tiny model, with compiling turned into a failure: every check comes first."""

    def compiled(*args):
        raise AssertionError("generate compiled a request it should have refused")

    monkeypatch.setattr(gen, "_compiled", compiled)
    return tiny_model


def _refused(model, match: str, prompts=((1, 2, 3),), **kwargs) -> str:
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=match) as raised:
        gen.generate(model, prompts, **kwargs)
    message = str(raised.value)
    assert "\n" not in message and "expected" in message, message
    return message


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([[1, -1]], r"prompt_ids\[0\]\[1\]=-1: expected a token id, an int in \[0, 128\)"),
        ([[1, 2], [3, 128]], r"prompt_ids\[1\]\[1\]=128: expected .*\[0, 128\)"),
        ([[10**9]], r"prompt_ids\[0\]\[0\]=1000000000: expected"),
        ([[5], [1, 2.0]], r"prompt_ids\[1\]\[1\]=2\.0: expected a token id, an int"),
        ([[1, 2.5]], r"prompt_ids\[0\]\[1\]=2\.5: expected"),
        ([[True, 2]], r"prompt_ids\[0\]\[0\]=True: expected"),
        ([[1, np.bool_(False)]], r"prompt_ids\[0\]\[1\]=.*False.*: expected"),
    ],
    ids=["negative", "id == vocab", "far beyond", "float", "float 2.5", "bool", "numpy bool"],
)
def test_bad_prompt_ids_are_refused(model, prompts, match):
    _refused(model, match, prompts)


def test_numpy_ids_are_checked_as_ids(model):
    _refused(model, r"prompt_ids\[0\]\[2\]=np.int64\(-3\)", [np.array([4, 5, -3], np.int64)])
    _refused(model, r"prompt_ids\[1\]\[0\]=.*500.*: expected", [[1], np.array([500], np.int32)])


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], r"prompt_ids=\[\]: expected at least one prompt"),
        ([[1], []], r"prompt_ids\[1\]=\[\]: expected a prompt of at least one token id"),
        ([[]], r"prompt_ids\[0\]=\[\]: expected"),
        ([1, 2, 3], r"prompt_ids\[0\]=1: expected a prompt"),  # one prompt, not a batch
        (["hello"], r"prompt_ids\[0\]='hello': expected a prompt"),
    ],
    ids=["no prompts", "an empty prompt", "only an empty prompt", "flat list", "text"],
)
def test_missing_or_malformed_prompts_are_refused(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(model, prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match=match):  # left_pad says the same
        gen.left_pad(prompts, pad_id=0)


def test_ids_beyond_the_vocab_limit_are_refused(model):
    message = _refused(
        model, r"prompt_ids\[0\]\[1\]=100: .*\[0, 100\)", [[1, 100]], vocab_limit=100
    )
    assert "vocab_limit" in message
    _refused(model, r"prompt_ids\[0\]\[0\]=127: .*\[0, 100\)", [[127]], vocab_limit=100)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, None])
def test_max_new_tokens_must_be_positive_int(model, value):
    _refused(model, rf"max_new_tokens={value}: expected a positive int", max_new_tokens=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, -1e-9, "0.7"])
def test_temperature_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match=r"^temperature=.*: expected a finite number >= 0"):
        gen.Sampling(temperature=value)


@pytest.mark.parametrize("value", [-1, 2.0, True, math.nan])
def test_top_k_must_be_a_non_negative_int(value):
    with pytest.raises(ValueError, match=r"^top_k=.*: expected an int >= 0"):
        gen.Sampling(temperature=1.0, top_k=value)


@pytest.mark.parametrize(("top_k", "vocab_limit"), [(129, None), (10**6, None), (101, 100)])
def test_top_k_beyond_the_vocabulary_is_refused(model, top_k, vocab_limit):
    vocab = vocab_limit or 128
    _refused(
        model,
        rf"^top_k={top_k}: expected an int in \[0, {vocab}\]",
        sampling=gen.Sampling(temperature=1.0, top_k=top_k),
        vocab_limit=vocab_limit,
    )


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, math.nan, math.inf])
def test_top_p_must_be_in_zero_one(value):
    with pytest.raises(ValueError, match=r"^top_p=.*: expected a number in \(0, 1\]"):
        gen.Sampling(temperature=1.0, top_p=value)


@pytest.mark.parametrize("length", [32, 33, 1000])
def test_a_prompt_longer_than_max_seq_len_is_refused(model, length):
    message = _refused(
        model, rf"prompt_ids\[1\] has {length} tokens: expected at most 31", [[1], [2] * length]
    )
    assert "max_seq_len=32" in message and "shorten the prompt" in message


@pytest.mark.parametrize(
    ("prompts", "max_new_tokens", "room"),
    [([[1] * 20], 13, 12), ([[1], [2] * 31], 2, 1), ([[3] * 10, [4] * 16], 10**6, 16)],
)
def test_prompt_plus_new_tokens_beyond_max_seq_len_is_refused(model, prompts, max_new_tokens, room):
    message = _refused(
        model,
        rf"^max_new_tokens={max_new_tokens}: expected at most {room}",
        prompts,
        max_new_tokens=max_new_tokens,
    )
    T = max(map(len, prompts))
    assert f"{T} tokens" in message and "max_seq_len=32" in message
    assert "lower max_new_tokens" in message


@pytest.mark.parametrize("value", [129, 0, -1, 100.0, True])
def test_vocab_limit_must_fit_the_model(model, value):
    _refused(
        model, rf"^vocab_limit={value}: expected None or an int in \[1, 128\]", vocab_limit=value
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_ids": (128,)}, r"^stop_ids\[0\]=128: expected a token id"),
        ({"stop_ids": (5, -1)}, r"^stop_ids\[1\]=-1: expected"),
        ({"stop_ids": (100,), "vocab_limit": 100}, r"^stop_ids\[0\]=100: .*\[0, 100\)"),
        ({"stop_ids": 7}, r"^stop_ids=7: expected a sequence of token ids"),
        ({"pad_id": 128}, r"^pad_id=128: expected an int in \[0, 128\)"),
        ({"pad_id": -1}, r"^pad_id=-1: expected"),
        ({"sampling": {"temperature": 1.0}}, r"^sampling=.*: expected a generate.Sampling"),
    ],
    ids=["stop beyond", "negative stop", "stop beyond limit", "one int", "pad", "pad<0", "dict"],
)
def test_stop_ids_pad_id_and_sampling_are_checked(model, kwargs, match):
    _refused(model, match, **kwargs)


def test_the_edges_of_every_range_are_accepted():
    """What is allowed right at each limit passes the checks (the first failure names it)."""
    gen.check_request(CONFIG, [[0] * 31, [127]], 1)  # 31 + 1 == max_seq_len
    gen.check_request(CONFIG, [[1], [2] * 20], 12, gen.Sampling(1e-3, 128, 1.0))
    gen.check_request(
        CONFIG,
        np.array([[0, 99], [7, 8]], np.int32),
        4,
        gen.Sampling(2.0, 100, 1e-6),
        100,
        stop_ids=np.array([99]),
        pad_id=127,
    )
    gen.check_request(CONFIG, [(np.int64(5), 6)], 2, vocab_limit=128, stop_ids=[0, 127])
    assert gen.Sampling(np.float32(0.5), np.int32(3), np.float64(0.9)).top_k == 3


@pytest.mark.slow
def test_the_entry_point_exits_non_zero_naming_the_flag(tmp_path, tiny_model):
    export = tmp_path / "export"
    checkpoint.export_params(nnx.state(tiny_model, nnx.Param), CONFIG, str(export))
    for flags, named in (
        (["--prompt_ids=1,2,3", "--max_new_tokens=0"], "max_new_tokens=0: expected a positive int"),
        (["--prompt_ids=1,x"], "--prompt_ids='1,x': expected comma-separated ints"),
    ):
        result = helpers.run(
            "experiments/generate.py", f"--checkpoint={export}", *flags, timeout=300, check=False
        )
        assert result.returncode != 0, result.stdout[-2000:]
        assert named in result.stderr, result.stderr[-3000:]
