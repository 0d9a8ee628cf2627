"""Experiment configs refuse values that would silently harm a run (every checkpoint deleted, no
update ever applied, an eval split that does not exist, sequences longer than the model's
context): `experiment.validate` names the key, its value and what was expected."""

import importlib.util
import math

import ml_collections
import pytest

from dbrx_jax import experiment, train
from tests import helpers


def _tiny(**overrides) -> ml_collections.ConfigDict:
    """configs/tiny.py's config with `overrides` (dotted keys: "data.eval_fraction")."""
    path = helpers.ROOT / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location("configs.tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        *sections, name = key.split(".")
        section = config
        for s in sections:
            section = section[s]
        setattr(section, name, value)
    return config


def _refused(match: str, **overrides) -> str:
    with pytest.raises(ValueError, match=match) as raised:
        experiment.validate(_tiny(**overrides))
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def test_tiny_config_is_valid():
    experiment.validate(_tiny())


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_checkpoints_below_one_is_refused_while_checkpointing(keep):
    message = _refused(
        rf"^config\.keep_checkpoints={keep}: expected an int >= 1",
        checkpoint_every_steps=5,
        keep_checkpoints=keep,
    )
    assert "would delete every checkpoint" in message
    experiment.validate(_tiny(checkpoint_every_steps=0, keep_checkpoints=keep))  # not used


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("checkpoint_every_steps", -1, "an int >= 0"),
        ("eval_every_steps", -5, "an int >= 0"),
        ("data.packing_bins", -1, "an int >= 0"),
        ("data.worker_count", -2, "an int >= 0"),
        ("max_nonfinite_steps", 0, "a positive int"),
        ("max_nonfinite_steps", -1, "a positive int"),
        ("sample_tokens", 0, "a positive int"),
        ("sample_tokens", -3, "a positive int"),
        ("data.spm_vocab_size", 0, "a positive int"),
        ("eval_batches", 0, "a positive int"),
    ],
)
def test_counts_out_of_range_are_refused(key, value, expected):
    _refused(rf"^config\.{key}={value}: expected {expected}", **{key: value})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("learning_rate", math.inf, "a finite positive number"),
        ("learning_rate", math.nan, "a finite positive number"),
        ("learning_rate", 0.0, "a finite positive number"),
        ("min_lr_ratio", -0.1, r"a number in \[0, 1\]"),
        ("min_lr_ratio", 1.5, r"a number in \[0, 1\]"),
        ("min_lr_ratio", math.nan, r"a number in \[0, 1\]"),
        ("grad_clip", 0.0, "a finite positive number .*0 would zero every update"),
        ("grad_clip", -1.0, "a finite positive number"),
        ("grad_clip", math.nan, "a finite positive number"),
        ("grad_clip", math.inf, "a finite positive number"),
        ("b1", 1.0, r"a number in \[0, 1\)"),
        ("b1", -0.1, r"a number in \[0, 1\)"),
        ("b1", math.nan, r"a number in \[0, 1\)"),
        ("b2", 1.5, r"a number in \[0, 1\)"),
        ("b2", 1.0, r"a number in \[0, 1\)"),
        ("weight_decay", -0.1, "a finite number >= 0"),
        ("weight_decay", math.nan, "a finite number >= 0"),
        ("weight_decay", math.inf, "a finite number >= 0"),
        ("data.eval_fraction", -0.1, r"a number in \[0, 0.5\]"),
        ("data.eval_fraction", 0.6, r"a number in \[0, 0.5\]"),
        ("data.eval_fraction", 1.0, r"a number in \[0, 0.5\]"),
        ("data.eval_fraction", math.nan, r"a number in \[0, 0.5\]"),
    ],
)
def test_rates_and_fractions_out_of_range_are_refused(key, value, expected):
    _refused(rf"^config\.{key}={value!r}: expected {expected}", **{key: value})


def test_evaluating_needs_an_eval_split():
    _refused(
        r"^config\.data\.eval_fraction=0\.0: expected > 0 when eval_every_steps > 0",
        **{"data.eval_fraction": 0.0},
    )
    experiment.validate(_tiny(eval_every_steps=0, **{"data.eval_fraction": 0.0}))


def test_keeping_the_best_checkpoint_needs_evaluations():
    _refused(
        r"^config\.keep_best_checkpoint=True: expected False when eval_every_steps=0",
        keep_best_checkpoint=True,
        eval_every_steps=0,
    )
    experiment.validate(_tiny(keep_best_checkpoint=True, checkpoint_every_steps=5))


@pytest.mark.parametrize(
    ("overrides", "max_seq_len"),
    [
        ({"seq_len": 257}, 256),  # dbrx-tiny's own max_seq_len
        ({"seq_len": 4096}, 256),
        ({"model.max_seq_len": 32}, 32),  # tiny.py's seq_len=64 over an overridden model
    ],
)
def test_seq_len_beyond_the_models_max_seq_len_is_refused(overrides, max_seq_len):
    message = _refused(r"^config\.seq_len=\d+: expected at most", **overrides)
    assert f"the model's max_seq_len={max_seq_len}" in message
    assert "lower seq_len or raise config.model.max_seq_len" in message


def test_seq_len_up_to_max_seq_len_is_accepted():
    experiment.validate(_tiny(seq_len=256))
    experiment.validate(_tiny(seq_len=300, **{"model.max_seq_len": 512}))


def test_sample_tokens_leave_room_for_the_prompt():
    _refused(
        r"^config\.sample_tokens=256: expected less than the model's max_seq_len=256",
        sample_prompts="In the beginning",
        sample_tokens=256,
    )
    experiment.validate(_tiny(sample_prompts="", sample_tokens=256))  # no sampling: unused
    experiment.validate(_tiny(sample_prompts="In the beginning", sample_tokens=255))


def test_sample_prompts_too_long_are_refused_before_training(tmp_path):
    config = _tiny()
    config.sample_prompts = "In the beginning " * 40
    config.model.max_seq_len = 64
    with pytest.raises(ValueError, match=r"config.sample_prompts .*has \d+ tokens: expected at"):
        train.train(config, str(tmp_path), progress=False)
    assert not (tmp_path / "config.json").exists()
