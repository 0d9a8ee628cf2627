"""The training step and loop: golden metrics, learning, packing, accumulation, configs."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import Dbrx, data, experiment, flops, metrics, optim, sharding, state, train
from tests import helpers

GOLDEN = helpers.ROOT / "tests" / "golden" / "train_step_tiny.json"


def _tiny_config(**changes) -> ml_collections.ConfigDict:
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny", vocab_size=256)
    config.batch_size, config.seq_len, config.warmup_steps = 8, 16, 0
    config.mesh.data = 8
    for key, value in changes.items():
        config[key] = value
    return config


def _random_batch(seed=0, rows=8, length=17, vocab=256):
    tokens = np.random.RandomState(seed).randint(4, vocab, (rows, length)).astype(np.int32)
    return data.model_batch(tokens)


def _setup(config):
    mesh = sharding.make_mesh(dict(config.mesh))
    model_config = experiment.model_config(config.model)
    tx = optim.make_optimizer(config)
    graphdef, params, opt_state, _ = state.init_train_state(model_config, tx, mesh, config.seed)
    step = train.make_train_step(graphdef, tx, config.grad_accum_steps)
    return mesh, graphdef, params, opt_state, step


def test_one_step_matches_golden():
    config = _tiny_config()
    mesh, _, params, opt_state, step = _setup(config)
    _, _, got = step(params, opt_state, sharding.shard_batch(_random_batch(), mesh), None)
    got = {k: metrics.to_python(v) for k, v in jax.device_get(got).items()}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert got.keys() == golden.keys()
    for key, value in golden.items():
        np.testing.assert_allclose(
            got[key],
            value,
            rtol=2e-4,
            atol=1e-6,
            err_msg=f"train-step metric {key!r} changed. If the change to the model, loss or "
            "optimizer is intended, regenerate the golden file with "
            "UPDATE_GOLDEN=1 pytest tests/test_train.py -k golden",
        )


@pytest.mark.slow
def test_thirty_steps_on_a_repeated_batch_halve_the_loss():
    config = _tiny_config(learning_rate=1e-2, total_steps=30)
    mesh, _, params, opt_state, step = _setup(config)
    batch = sharding.shard_batch(_random_batch(seed=1), mesh)
    losses = []
    for _ in range(30):
        params, opt_state, m = step(params, opt_state, batch, None)
        losses.append(float(m["ce"]))
    assert losses[-1] <= 0.5 * losses[0], losses


@pytest.mark.slow
def test_packed_rows_never_attend_across_segments():
    """In a packed row, no target of document 2 depends on an input of document 1."""
    model = Dbrx(experiment.model_config(_tiny_config().model), rngs=nnx.Rngs(0))
    tokens = np.random.RandomState(2).randint(4, 256, (2, 17)).astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 10, [1] * 12 + [2] * 4 + [0]])
    batch = {k: jnp.asarray(v) for k, v in data.model_batch(tokens, segments).items()}
    embeds = jnp.take(model.wte[...], batch["inputs"], axis=0)

    def doc2_loss(embeds):
        logits = model(
            inputs_embeds_BTD=embeds,
            segment_ids_BT=batch["segment_ids"],
            positions_BT=batch["positions"],
        ).logits
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)
        in_doc2 = (batch["segment_ids"] == 2) & (batch["loss_mask"] > 0)
        return jnp.sum(ce[..., 0] * in_doc2)

    grad = np.abs(np.asarray(jax.grad(doc2_loss)(embeds))).sum(-1)
    seg = np.asarray(batch["segment_ids"])
    assert np.all(grad[seg == 1] == 0) and np.all(grad[seg == 0] == 0)
    assert np.all(grad[(seg == 2) & (np.asarray(batch["positions"]) < 3)] > 0)
    # The loss mask drops the target that crosses the boundary and padding.
    assert batch["loss_mask"][0, 6] == 0 and batch["loss_mask"][1, 15] == 0


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_step():
    """4 micro-batches of B give the gradients of one pass over 4B (fp32). With the
    load-balancing loss on, the two differ by design (it is averaged per micro-batch), so it is
    off here. (Compared before the optimizer: Adam's first update, g / |g|, would magnify
    rounding in near-zero gradients.)"""
    config = _tiny_config(batch_size=32)
    config.mesh.data, config.mesh.expert = 2, 4
    config.model.moe_loss_weight = 0.0
    mesh, graphdef, params, _, _ = _setup(config)
    batch = sharding.shard_batch(_random_batch(seed=3, rows=32), mesh)
    results = {}
    for accum in (1, 4):
        results[accum] = jax.jit(train.accumulate_gradients, static_argnums=(0, 4))(
            graphdef, params, batch, None, accum
        )
    (g1, m1), (g4, m4) = results[1], results[4]
    assert float(m4["ce"]) == pytest.approx(float(m1["ce"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_no_weight_decay_on_norms_and_embeddings():
    model = Dbrx(experiment.model_config(_tiny_config().model), rngs=nnx.Rngs(0))
    mask = optim.decay_mask(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert not any(v for k, v in flat.items() if "norm" in k or "wte" in k)
    assert all(v for k, v in flat.items() if any(n in k for n in ("w1", "wqkv", "lm_head")))


@pytest.mark.slow
def test_lion_and_schedule():
    config = _tiny_config(optimizer="lion", learning_rate=1e-3, warmup_steps=10, total_steps=100)
    schedule = optim.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    mesh, _, params, opt_state, step = _setup(config)
    _, _, m = step(params, opt_state, sharding.shard_batch(_random_batch(), mesh), None)
    assert np.isfinite(float(m["loss"]))


def test_config_typos_fail_loudly():
    config = experiment.base_config()
    with pytest.raises(AttributeError, match="total_step"):
        config.total_step = 5  # locked: no new keys
    bad = ml_collections.ConfigDict(experiment.base_config().to_dict())
    bad.learnin_rate = 1.0
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) \['learnin_rate'\]; valid keys: .*"
        r"'learning_rate'",
    ):
        experiment.validate(bad)
    with pytest.raises(ValueError, match="model override 'n_layer' is not a DbrxConfig field"):
        experiment.model_section("dbrx-tiny", n_layer=3)
    with pytest.raises(ValueError, match="batch_size=10: expected a multiple of grad_accum"):
        experiment.validate(_tiny_config(batch_size=10, grad_accum_steps=4))
    with pytest.raises(
        ValueError, match=r"'gmm_impl' is not a DbrxConfig field \(renamed: \['moe_gmm_impl'\]\)"
    ):
        experiment.model_section("dbrx-tiny", gmm_impl="blocked")


@pytest.mark.slow
def test_a_config_typo_on_the_command_line_is_refused():
    result = helpers.run(
        "experiments/train.py",
        "--config=configs/tiny.py",
        "--config.total_step=3",
        "--workdir=/tmp/unused",
        timeout=120,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--config.total_step: the config has no key" in lines[0]
    assert "did you mean 'total_steps'?" in lines[0]


def test_model_vocab_follows_the_tokenizer():
    section = experiment.model_section("dbrx-tiny")
    assert experiment.model_config(section, vocab_size=1000).vocab_size == 1024
    section.vocab_size = 512
    with pytest.raises(ValueError, match="smaller than the tokenizer's 1000"):
        experiment.model_config(section, vocab_size=1000)


def test_peak_flops_by_device_kind():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("cpu") is None


@pytest.mark.slow
def test_train_entry_point_writes_metrics_and_tensorboard(tmp_path):
    result = helpers.run(
        "experiments/train.py",
        "--config=configs/tiny.py",
        "--config.total_steps=6",
        "--config.log_every_steps=3",
        "--config.eval_every_steps=6",
        f"--workdir={tmp_path}",
    )
    assert "MoE plan (cpu): dropless dispatch (grouped GEMM: blocked)" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 3, 6]
    for key in (
        "loss",
        "perplexity",
        "load_balancing",
        "expert_load_max",
        "expert_load_min",
        "router_entropy",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
        "step_time",
    ):
        assert key in train_rows[-1], key
    assert any("eval_loss" in r for r in rows)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "spm_1024.model").exists()
    assert helpers.json_report(result.stdout)["steps"] == 6
