"""Checkpoints: exact resume after SIGKILL, SIGTERM, another mesh, corruption, NaNs, configs,
and params-only exports."""

import json
import logging
import shutil
import signal
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dbrx_jax
from dbrx_jax import data, experiment, optim, sharding, state, train
from dbrx_jax.io import checkpoint
from dbrx_jax.io.pretrained import load_params
from dbrx_jax.tokenizer import SentencePieceTokenizer, tokenizer_for_checkpoint
from tests import helpers

TRAIN = (
    "experiments/train.py",
    "--config=configs/tiny.py",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
)


def _losses(workdir) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a restart) keeps its last value."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _run(workdir, *flags, check=True):
    return helpers.run(*TRAIN, f"--workdir={workdir}", *flags, check=check)


def _start(workdir, *flags):
    return helpers.start(*TRAIN, f"--workdir={workdir}", *flags)


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        metrics_file = workdir / "metrics.jsonl"
        if metrics_file.exists() and max(_losses(workdir), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    steps = ["--config.total_steps=20", "--config.checkpoint_every_steps=5"]
    _run(tmp_path / "straight", *steps)
    expected = _losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 21))

    killed = tmp_path / "killed"
    proc = _start(killed, *steps)
    _wait_for_step(proc, killed, 12)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(killed)) < 20
    _run(killed, *steps)
    assert _losses(killed) == expected  # bitwise: the same floats, step by step


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start(tmp_path, "--config.total_steps=200", "--config.checkpoint_every_steps=100")
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = helpers.json_report(out)
    assert summary["preempted"] is True
    saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps()
    assert saved == [summary["steps"]] and 3 <= saved[0] < 100


def _state(sizes, seed=0):
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny", vocab_size=256)
    model_config = experiment.model_config(config.model)
    tx = optim.make_optimizer(config)
    mesh = sharding.make_mesh(sizes)
    return model_config, tx, mesh, state.init_train_state(model_config, tx, mesh, seed)


def _data_iterator():
    tokens = np.random.RandomState(0).randint(4, 200, (64,)).astype(np.int32)
    return iter(grain.MapDataset.source([tokens] * 8).to_iter_dataset())


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    model_config, tx, _, (graphdef, params, opt_state, _) = _state({"data": 8})
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(5, {"params": params, "opt_state": opt_state}, _data_iterator(), {"a": 1})
    saver.wait()
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    graphdef, abstract_params, abstract_opt, _ = state.abstract_train_state(model_config, tx, mesh)
    restored = checkpoint.Checkpointer(str(tmp_path)).restore(
        5, {"params": abstract_params, "opt_state": abstract_opt}, _data_iterator()
    )
    w1 = restored["params"]["blocks"]["ffn"]["w1"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, None)
    np.testing.assert_array_equal(w1, params["blocks"]["ffn"]["w1"])
    step = train.make_train_step(graphdef, tx)  # the model built for the new mesh
    batch = sharding.shard_batch(
        data.model_batch(np.random.RandomState(1).randint(4, 200, (8, 17)).astype(np.int32)), mesh
    )
    _, _, m = step(restored["params"], restored["opt_state"], batch, None)
    assert np.isfinite(float(m["loss"]))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    _, _, _, (_, params, opt_state, _) = _state({"data": 8})
    saver = checkpoint.Checkpointer(str(tmp_path))
    for step in (5, 10):
        saver.save(step, {"params": params, "opt_state": opt_state}, _data_iterator(), {})
    saver.wait()
    shutil.rmtree(tmp_path / "10" / "state")  # a half-deleted newest step
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": params, "opt_state": opt_state},
    )
    with caplog.at_level(logging.WARNING):
        step, restored = checkpoint.Checkpointer(str(tmp_path)).restore_latest(
            abstract, _data_iterator()
        )
    assert step == 5 and restored is not None
    assert any("/10 cannot be restored" in r.message for r in caplog.records)


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_not_applied():
    _, tx, mesh, (graphdef, params, opt_state, _) = _state({"data": 8})
    before = jax.device_get(params)
    tokens = np.random.RandomState(0).randint(4, 200, (8, 17)).astype(np.int32)
    batch = data.model_batch(tokens)
    batch["targets"][0, 0] = 10**6  # out of the vocabulary: the loss is NaN
    step = train.make_train_step(graphdef, tx)
    params, _, m = step(params, opt_state, sharding.shard_batch(batch, mesh), None)
    assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    proc = _run(
        tmp_path,
        "--config.total_steps=20",
        "--config.checkpoint_every_steps=1",
        "--config.max_nonfinite_steps=3",
        "--config.learning_rate=1e30",
        "--config.warmup_steps=0",
        "--config.grad_clip=1e30",
        check=False,
    )
    assert proc.returncode != 0
    assert "the loss was not finite for 3 consecutive steps" in proc.stderr
    steps = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps()
    losses = _losses(tmp_path)
    assert steps and all(np.isfinite(losses[s]) for s in steps)


@pytest.mark.slow
def test_a_workdir_of_another_model_is_refused(tmp_path):
    _run(tmp_path, "--config.total_steps=4", "--config.checkpoint_every_steps=2")
    result = _run(
        tmp_path,
        "--config.total_steps=6",
        "--config.checkpoint_every_steps=2",
        "--config.model.n_layers=3",
        check=False,
    )
    assert result.returncode != 0
    assert "holds checkpoints of a different model (n_layers: 2 -> 3)" in result.stderr
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps() == [2, 4]


@pytest.mark.slow
def test_export_loads_with_from_pretrained_and_starts_a_new_run(tmp_path):
    workdir, export = tmp_path / "run", tmp_path / "export"
    _run(workdir, "--config.total_steps=3", "--config.checkpoint_every_steps=3")
    assert state.export_from_workdir(str(workdir), str(export)) == 3
    with pytest.raises(ValueError, match="has no step 2; its steps: \\[3\\]"):
        state.export_from_workdir(str(workdir), str(tmp_path / "other"), step=2)
    model = dbrx_jax.from_pretrained(export)
    # The run's sentencepiece model goes with it: generation and evaluation find it there.
    assert (export / "spm_1024.model").is_file()
    assert isinstance(tokenizer_for_checkpoint(str(export), 512), SentencePieceTokenizer)
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, 200, (2, 8)), jnp.int32)
    logits = model(tokens).logits
    assert np.isfinite(np.asarray(logits)).all()
    # A new run from the export: step 0 with a fresh optimizer, the exported weights.
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny")
    config.init_from = str(export)
    abstract = state.abstract_train_state(
        model.config, optim.make_optimizer(config), sharding.make_mesh({"data": 8})
    )[1]
    params = load_params(str(export), model.config, abstract)
    np.testing.assert_array_equal(params["wte"], nnx.state(model, nnx.Param)["wte"])
    other = experiment.model_config(
        experiment.model_section("dbrx-tiny", n_layers=3, vocab_size=1024)
    )
    with pytest.raises(checkpoint.ConfigMismatchError, match="n_layers: 2 -> 3"):
        load_params(str(export), other, abstract)
