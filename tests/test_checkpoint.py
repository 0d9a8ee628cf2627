"""Checkpoints: exact resume after SIGKILL, SIGTERM, another mesh, corruption, NaNs, configs,
and params-only exports."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dbrx_jax
from dbrx_jax import checkpoint, data, experiment, optim, sharding, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = [
    sys.executable,
    "experiments/train.py",
    "--config=configs/tiny.py",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=0",
]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _losses(workdir) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a restart) keeps its last value."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _run(workdir, *flags, timeout=600):
    result = subprocess.run(
        [*TRAIN, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _start(workdir, *flags):
    return subprocess.Popen(
        [*TRAIN, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        metrics_file = workdir / "metrics.jsonl"
        if metrics_file.exists() and max(_losses(workdir), default=0) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


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


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _start(tmp_path, "--config.total_steps=200", "--config.checkpoint_every_steps=100")
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert summary["preempted"] is True
    saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps()
    assert saved == [summary["steps"]] and 3 <= saved[0] < 100


def _state(sizes, seed=0):
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny", vocab_size=256)
    model_config = experiment.model_config(config.model)
    tx = optim.make_optimizer(config)
    mesh = sharding.make_mesh(sizes)
    return model_config, tx, mesh, train.init_train_state(model_config, tx, mesh, seed)


def _data_iterator():
    tokens = np.random.RandomState(0).randint(4, 200, (64,)).astype(np.int32)
    import grain

    return iter(grain.MapDataset.source([tokens] * 8).to_iter_dataset())


def test_restore_onto_a_different_mesh(tmp_path):
    model_config, tx, _, (graphdef, params, opt_state) = _state({"data": 8})
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(5, {"params": params, "opt_state": opt_state}, _data_iterator(), {"a": 1})
    saver.wait()
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    _, abstract_params, abstract_opt = train.abstract_train_state(model_config, tx, mesh)
    state = checkpoint.Checkpointer(str(tmp_path)).restore(
        5, {"params": abstract_params, "opt_state": abstract_opt}, _data_iterator()
    )
    w1 = state["params"]["blocks"]["ffn"]["w1"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, None)
    np.testing.assert_array_equal(w1, params["blocks"]["ffn"]["w1"])
    step = train.make_train_step(graphdef, tx, mesh)
    batch = sharding.shard_batch(
        data.model_batch(np.random.RandomState(1).randint(4, 200, (8, 17)).astype(np.int32)), mesh
    )
    _, _, m = step(state["params"], state["opt_state"], batch, None)
    assert np.isfinite(float(m["loss"]))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    _, _, _, (_, params, opt_state) = _state({"data": 8})
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
        step, state = checkpoint.Checkpointer(str(tmp_path)).restore_latest(
            abstract, _data_iterator()
        )
    assert step == 5 and state is not None
    assert any("/10 cannot be restored" in r.message for r in caplog.records)


def test_a_nonfinite_step_is_skipped_not_applied():
    _, tx, mesh, (graphdef, params, opt_state) = _state({"data": 8})
    before = jax.device_get(params)
    tokens = np.random.RandomState(0).randint(4, 200, (8, 17)).astype(np.int32)
    batch = data.model_batch(tokens)
    batch["targets"][0, 0] = 10**6  # out of the vocabulary: the loss is NaN
    step = train.make_train_step(graphdef, tx, mesh)
    params, _, m = step(params, opt_state, sharding.shard_batch(batch, mesh), None)
    assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            *TRAIN,
            f"--workdir={tmp_path}",
            "--config.total_steps=20",
            "--config.checkpoint_every_steps=1",
            "--config.max_nonfinite_steps=3",
            "--config.learning_rate=1e30",
            "--config.warmup_steps=0",
            "--config.grad_clip=1e30",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "the loss was not finite for 3 consecutive steps" in proc.stderr
    steps = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps()
    losses = _losses(tmp_path)
    assert steps and all(np.isfinite(losses[s]) for s in steps)


def test_a_workdir_of_another_model_is_refused(tmp_path):
    _run(tmp_path, "--config.total_steps=4", "--config.checkpoint_every_steps=2")
    result = subprocess.run(
        [
            *TRAIN,
            f"--workdir={tmp_path}",
            "--config.total_steps=6",
            "--config.checkpoint_every_steps=2",
            "--config.model.n_layers=3",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "holds checkpoints of a different model (n_layers: 2 -> 3)" in result.stderr
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).steps() == [2, 4]


def test_export_loads_with_from_pretrained_and_starts_a_new_run(tmp_path):
    workdir, export = tmp_path / "run", tmp_path / "export"
    _run(workdir, "--config.total_steps=3", "--config.checkpoint_every_steps=3")
    assert checkpoint.export_from_workdir(str(workdir), str(export)) == 3
    model = dbrx_jax.from_pretrained(export)
    tokens = jnp.asarray(np.random.RandomState(0).randint(4, 200, (2, 8)), jnp.int32)
    logits = model(tokens).logits
    assert np.isfinite(np.asarray(logits)).all()
    # A new run from the export: step 0 with a fresh optimizer, the exported weights.
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny")
    config.init_from = str(export)
    abstract = train.abstract_train_state(
        model.config, optim.make_optimizer(config), sharding.make_mesh({"data": 8})
    )[1]
    params = train.load_params(str(export), model.config, abstract)
    np.testing.assert_array_equal(params["wte"], nnx.state(model, nnx.Param)["wte"])
    other = experiment.model_config(
        experiment.model_section("dbrx-tiny", n_layers=3, vocab_size=1024)
    )
    with pytest.raises(checkpoint.ConfigMismatchError, match="n_layers: 2 -> 3"):
        train.load_params(str(export), other, abstract)
