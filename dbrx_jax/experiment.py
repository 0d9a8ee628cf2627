"""Experiment configs: the ml_collections schema every `configs/*.py` starts from, and its checks.

`base_config()` holds every key with its default; a config file changes values, never adds keys
(the dict is locked), and the command line overrides any of them (`--config.total_steps=100`,
`--config.mesh.expert=4`, `--config.model.n_layers=8`). A misspelled key fails loudly.

`model` is a preset plus overrides: every `DbrxConfig` field is a typed placeholder whose None
means "the preset's value" (so a field cannot be set to None from the command line).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import ml_collections
from ml_collections import config_dict

from dbrx_jax.config import PRESETS, DbrxConfig, renamed_hint
from dbrx_jax.sharding import MESH_AXES

_PLACEHOLDER_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _placeholder_type(annotation: str):
    """The type a DbrxConfig field's placeholder parses command-line values as."""
    first = annotation.split("|")[0].strip()
    return _PLACEHOLDER_TYPES.get(first, object)


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown DBRX preset {preset!r}; presets: {sorted(PRESETS)}")
    section = {"preset": preset}
    for field in dataclasses.fields(DbrxConfig):
        annotation = field.type if isinstance(field.type, str) else str(field.type)
        section[field.name] = config_dict.placeholder(_placeholder_type(annotation))
    cd = ml_collections.ConfigDict(section)
    for key, value in overrides.items():
        if key not in section:
            raise ValueError(
                f"model override {key!r} is not a DbrxConfig field{renamed_hint([key])}"
            )
        setattr(cd, key, value)
    return cd


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment config has, with defaults (a small CPU run)."""
    c = ml_collections.ConfigDict()
    c.model = model_section("dbrx-tiny")
    c.seed = 0
    c.total_steps = 100
    c.batch_size = 8  # global, in rows of seq_len tokens
    c.seq_len = 128
    c.optimizer = "adamw"  # adamw | lion (decoupled weight decay for both)
    c.learning_rate = 3e-3  # peak, after linear warmup; cosine decay to min_lr_ratio * peak
    c.min_lr_ratio = 0.1
    c.warmup_steps = 10
    c.b1 = 0.9
    c.b2 = 0.95
    c.weight_decay = 0.1  # not applied to norms and embeddings
    c.grad_clip = 1.0  # global norm
    c.grad_accum_steps = 1
    c.checkpoint_every_steps = 0  # 0: no checkpoints (nor resuming)
    c.keep_checkpoints = 3  # the latest N steps ...
    c.keep_best_checkpoint = False  # ... plus the one with the best eval loss
    c.max_nonfinite_steps = 5  # consecutive steps with a non-finite loss before the run stops
    c.init_from = ""  # start from these parameters (an export or an HF directory), new optimizer
    c.sample_prompts = ""  # after training, continue these prompts ("|"-separated), greedily
    c.sample_tokens = 40
    # Chat fine-tuning on data.source="kjv_chat": greedy replies to this many held-out (and as
    # many training) references, scored (exact match, character accuracy) before and after.
    c.score_references = 0
    c.eval_every_steps = 50
    c.eval_batches = 4
    c.log_every_steps = 10
    c.mesh = ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES})
    c.mesh.data = -1  # the rest of the devices
    c.data = ml_collections.ConfigDict(
        {
            "source": "kjv",  # kjv | text:<glob> | jsonl:<glob> | arrayrecord:<glob>
            "text_key": "text",
            # spm: train a sentencepiece model on the training split, cached in the workdir;
            # or dbrx, hf:<dir>, or the path of a sentencepiece .model file.
            "tokenizer": "spm",
            "spm_vocab_size": 4096,
            "eval_fraction": 0.02,
            "packing_bins": 0,  # 0: 4 x the per-process batch
            "worker_count": 0,  # grain worker processes; 0: a prefetch thread
        }
    )
    c.lock()
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """The config has exactly the schema's keys (each misspelling named with the valid keys)
    and sensible values: every number in its range (those a wrong value of would silently harm
    the run), and `seq_len` within the model's `max_seq_len`."""
    schema = base_config()
    _same_keys(config, schema, "config")
    for section in ("model", "mesh", "data"):
        _same_keys(config[section], schema[section], f"config.{section}")

    need = functools.partial(_need, config)

    for key in (
        "total_steps",
        "batch_size",
        "seq_len",
        "grad_accum_steps",
        "log_every_steps",
        "eval_batches",
    ):
        need(isinstance(config[key], int) and config[key] > 0, key, "a positive int")
    need(config.optimizer in ("adamw", "lion"), "optimizer", "'adamw' or 'lion'")
    need(
        config.learning_rate > 0 and math.isfinite(config.learning_rate),
        "learning_rate",
        "a finite positive number",
    )
    need(
        0 <= config.warmup_steps < config.total_steps,
        "warmup_steps",
        f"in [0, total_steps={config.total_steps})",
    )
    need(
        config.batch_size % config.grad_accum_steps == 0,
        "batch_size",
        f"a multiple of grad_accum_steps={config.grad_accum_steps}",
    )
    _check_ranges(config)
    _check_lengths(config, model_config(config.model))


def _need(config: ml_collections.ConfigDict, ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={config[key]!r}: expected {expected}")


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    """The numeric keys a wrong value of would silently harm the run (NaN fails every one)."""
    need = functools.partial(_need, config)
    for key in (
        "checkpoint_every_steps",
        "eval_every_steps",
        "score_references",
        "data.packing_bins",
    ):
        need(_is_int(config[key]) and config[key] >= 0, key, "an int >= 0 (0: off)")
    need(
        _is_int(config["data.worker_count"]) and config["data.worker_count"] >= 0,
        "data.worker_count",
        "an int >= 0 (0: a prefetch thread)",
    )
    for key in ("max_nonfinite_steps", "sample_tokens", "data.spm_vocab_size"):
        need(_is_int(config[key]) and config[key] > 0, key, "a positive int")
    if config.checkpoint_every_steps > 0:
        need(
            _is_int(config.keep_checkpoints) and config.keep_checkpoints >= 1,
            "keep_checkpoints",
            "an int >= 1 when checkpoint_every_steps > 0 (0 would delete every checkpoint)",
        )
    need(0 <= config.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
    need(
        0 < config.grad_clip < math.inf,
        "grad_clip",
        "a finite positive number (a global norm; 0 would zero every update)",
    )
    for key in ("b1", "b2"):
        need(0 <= config[key] < 1, key, "a number in [0, 1)")
    need(0 <= config.weight_decay < math.inf, "weight_decay", "a finite number >= 0")
    need(
        0 <= config.data.eval_fraction <= 0.5,
        "data.eval_fraction",
        "a number in [0, 0.5] (every round(1 / eval_fraction)-th document, at most every second, "
        "is held out)",
    )
    if config.eval_every_steps > 0:
        need(
            config.data.eval_fraction > 0,
            "data.eval_fraction",
            "> 0 when eval_every_steps > 0 (no eval split otherwise); or eval_every_steps=0",
        )
    if config.score_references:
        need(
            config.data.source == "kjv_chat",
            "score_references",
            "0 unless data.source='kjv_chat' (it scores that set's held-out references)",
        )
    if config.keep_best_checkpoint:
        need(
            config.eval_every_steps > 0,
            "keep_best_checkpoint",
            "False when eval_every_steps=0 (the best is by eval loss)",
        )


def _check_lengths(config: ml_collections.ConfigDict, model: DbrxConfig) -> None:
    """Sequence lengths against the context the model is built for (`max_seq_len`)."""
    need = functools.partial(_need, config)
    need(
        config.seq_len <= model.max_seq_len,
        "seq_len",
        f"at most the model's max_seq_len={model.max_seq_len} (lower seq_len or raise "
        "config.model.max_seq_len)",
    )
    if config.sample_prompts:
        need(
            config.sample_tokens < model.max_seq_len,
            "sample_tokens",
            f"less than the model's max_seq_len={model.max_seq_len}, leaving room for the prompt",
        )


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def process_batch_size(config: ml_collections.ConfigDict) -> int:
    """This process' share of the global batch (every process feeds the same number of rows)."""
    processes = jax.process_count()
    if config.batch_size % processes:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not a multiple of the {processes} processes"
        )
    return config.batch_size // processes


def _same_keys(config, schema, where: str) -> None:
    keys, valid = set(config.keys()), set(schema.keys())
    if keys - valid:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(keys - valid)}; valid keys: {sorted(valid)}"
        )
    if valid - keys:
        raise ValueError(f"{where}: missing key(s) {sorted(valid - keys)}")


def model_config(section: ml_collections.ConfigDict, vocab_size: int | None = None) -> DbrxConfig:
    """The DbrxConfig of a model section: the preset, then every non-None override. With
    `vocab_size` (the tokenizer's) and no override, the model's vocabulary is that rounded up
    to a multiple of 128 (as DBRX pads 100,280 ids to 100,352 rows)."""
    overrides = {k: v for k, v in section.items() if k != "preset" and v is not None}
    if isinstance(overrides.get("eos_token_id"), list):
        overrides["eos_token_id"] = tuple(overrides["eos_token_id"])
    if vocab_size is not None:
        if "vocab_size" not in overrides:
            overrides["vocab_size"] = -(-vocab_size // 128) * 128
        elif overrides["vocab_size"] < vocab_size:
            raise ValueError(
                f"config.model.vocab_size={overrides['vocab_size']} is smaller than "
                f"the tokenizer's {vocab_size} ids"
            )
    return DbrxConfig.preset(section.preset, **overrides)
