"""Faults on resume: a restore failure is corruption (fall back, the damaged step moved aside),
a mismatch (refused, nothing changed) or I/O (refused, nothing moved); a refused resume leaves
the workdir byte for byte as it was; damage never restores as zeros; an empty eval split fails
before the first step and a failing evaluation never loses the final state."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

import dbrx_jax
from benchmarks import hf_reference
from dbrx_jax import experiment, optim, sharding, state, train
from dbrx_jax.io import checkpoint, convert
from tests import helpers

# When one array of a restore fails, Orbax's reads of the others, still in flight, raise into an
# event loop that is closed by then; pytest reports each as an unraisable exception.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tiny_config(**changes):
    """configs/tiny.py, 4 steps with checkpoints at 2 and 4, no evaluation, and `changes`
    (dotted keys for sections: "model.n_layers")."""
    spec = importlib.util.spec_from_file_location("tiny", helpers.ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.total_steps, config.checkpoint_every_steps = 4, 2
    config.eval_every_steps, config.log_every_steps = 0, 1
    for key, value in changes.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return config


def _tree(directory) -> dict[str, bytes | None]:
    """Every file under `directory` with its bytes, and every directory (as None): what
    "nothing changed" compares."""
    out = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), directory)] = None
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _biggest_array_file(item_dir) -> str:
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(item_dir)
        for name in names
        if os.path.basename(root) == "d"  # OCDBT data files
    ]
    return max(files, key=os.path.getsize)


def _remove_ocdbt_key(item_dir, prefix: str) -> str:
    """Removes the first chunk of array `prefix` from an OCDBT item (as a damaged b-tree would
    lose it) and returns its key."""
    base = {"driver": "file", "path": str(item_dir) + "/"}
    store = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    key = sorted(
        k for k in store.list().result() if k.startswith(prefix.encode() + b"/") and b".z" not in k
    )[0]
    store.delete_range(ts.KvStore.KeyRange(key, key + b"\x00")).result()
    return key.decode()


def _as_if_written_by_an_older_orbax(item_dir) -> None:
    """Drops `store_array_data_equal_to_fill_value` from the item's metadata: Orbax then opens
    the arrays with fill_missing_data_reads=True, and a missing chunk reads as zeros."""
    path = os.path.join(item_dir, "_METADATA")
    with open(path) as f:
        metadata = json.load(f)
    del metadata["store_array_data_equal_to_fill_value"]
    with open(path, "w") as f:
        json.dump(metadata, f)


# ---------------------------------------------------------------------------------------------
# Checkpointer.restore_latest on a small state (no training): which failures fall back.


def _small_state(optimizer="adamw"):
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny", vocab_size=256)
    config.optimizer = optimizer
    model_config = experiment.model_config(config.model)
    tx = optim.make_optimizer(config)
    mesh = sharding.make_mesh({"data": 8})
    return model_config, tx, mesh


def _data_iterator():
    tokens = np.random.RandomState(0).randint(4, 200, (64,)).astype(np.int32)
    return iter(grain.MapDataset.source([tokens] * 8).to_iter_dataset())


def _abstract(optimizer="adamw"):
    model_config, tx, mesh = _small_state(optimizer)
    _, params, opt_state, _ = state.abstract_train_state(model_config, tx, mesh)
    return {"params": params, "opt_state": opt_state}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints at steps 5 and 10 of the small state (each test damages a copy)."""
    directory = tmp_path_factory.mktemp("saved")
    model_config, tx, mesh = _small_state()
    _, params, opt_state, _ = state.init_train_state(model_config, tx, mesh)
    saver = checkpoint.Checkpointer(str(directory))
    for step in (5, 10):
        saver.save(step, {"params": params, "opt_state": opt_state}, _data_iterator(), {})
    saver.close()
    return directory


def _truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "array file deleted": lambda step: os.remove(_biggest_array_file(step / "state")),
    "array file truncated": lambda step: _truncate(_biggest_array_file(step / "state"), 1000),
    "state _METADATA garbage": lambda step: (step / "state" / "_METADATA").write_text("{garb"),
    "state _METADATA truncated": lambda step: _truncate(step / "state" / "_METADATA"),
    "OCDBT manifest deleted": lambda step: (step / "state" / "manifest.ocdbt").unlink(),
    "chunk gone from the OCDBT tree": lambda step: _remove_ocdbt_key(
        step / "state", "params.wte.value"
    ),
    "data file garbage": lambda step: (step / "data" / "process_0-of-1.json").write_text("{"),
    "data file deleted": lambda step: (step / "data" / "process_0-of-1.json").unlink(),
    "state item deleted": lambda step: shutil.rmtree(step / "state"),
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_newest_step_is_set_aside_and_can_be_saved_again(saved, tmp_path, caplog, how):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    CORRUPTIONS[how](directory / "10")
    damaged = _tree(directory / "10")
    checkpointer = checkpoint.Checkpointer(str(directory))
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        step, restored = checkpointer.restore_latest(_abstract(), _data_iterator())
    assert step == 5 and restored is not None
    aside = directory / "10.corrupt-1"
    assert any(
        "/10 cannot be restored" in r.message and str(aside) in r.message for r in caplog.records
    )
    assert _tree(aside) == damaged  # moved, not changed
    assert checkpointer.steps() == [5]
    checkpointer.save(10, restored, _data_iterator(), {})  # the step can be saved again
    checkpointer.close()
    again = checkpoint.Checkpointer(str(directory))
    assert again.steps() == [5, 10] and again.restore_latest(_abstract(), _data_iterator())[0] == 10
    assert aside.is_dir()  # Orbax's cleanup of unfinished saves leaves it alone
    again.close()


def test_garbage_step_metadata_is_not_corruption(saved, tmp_path):
    """_CHECKPOINT_METADATA holds timestamps and metrics, which Orbax reads leniently; the items
    are intact, so the step restores (falling back would throw good work away)."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    (directory / "10" / "_CHECKPOINT_METADATA").write_text("{garbage")
    step, _ = checkpoint.Checkpointer(str(directory)).restore_latest(_abstract(), _data_iterator())
    assert step == 10 and sorted(os.listdir(directory)) == ["10", "5"]


def test_when_every_step_is_corrupt_nothing_is_moved_and_each_is_named(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    CORRUPTIONS["array file truncated"](directory / "10")
    CORRUPTIONS["state _METADATA garbage"](directory / "5")
    before = _tree(directory)
    checkpointer = checkpoint.Checkpointer(str(directory))
    with pytest.raises(
        checkpoint.CheckpointCorruptError,
        match=r"no checkpoint in .* restores.*/10 cannot be restored: its state item: "
        r"OUT_OF_RANGE.*/5 cannot be restored: its state item: \S+/5/state/_METADATA is not "
        r"valid JSON",
    ):
        checkpointer.restore_latest(_abstract(), _data_iterator())
    assert _tree(directory) == before


def test_another_optimizer_state_is_a_mismatch_not_corruption(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    before = _tree(directory)
    with pytest.raises(
        checkpoint.ConfigMismatchError,
        match=r"/10 does not fit this run's state: opt_state/1/0/nu/\S+ \(not in this run's",
    ):
        checkpoint.Checkpointer(str(directory)).restore_latest(_abstract("lion"), _data_iterator())
    assert _tree(directory) == before


def test_a_data_position_of_another_process_count_is_a_mismatch(saved, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    for step in ("5", "10"):
        data = directory / step / "data"
        shutil.copy(data / "process_0-of-1.json", data / "process_1-of-2.json")
        (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    before = _tree(directory)
    with pytest.raises(checkpoint.ConfigMismatchError, match="/10 holds the data position of 2 p"):
        checkpoint.Checkpointer(str(directory)).restore_latest(_abstract(), _data_iterator())
    assert _tree(directory) == before


def test_a_stored_chunk_never_restores_as_zeros(saved, tmp_path):
    """A chunk missing from the OCDBT tree: Orbax refuses it when the metadata says every chunk
    was stored; for metadata without that (an older Orbax), plain Orbax fills it with zeros,
    and the Checkpointer's own check refuses it."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    key = _remove_ocdbt_key(directory / "10" / "state", "params.wte.value")
    checkpointer = checkpoint.Checkpointer(str(directory))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="NOT_FOUND: chunk .* is missing"):
        checkpointer.restore(10, _abstract(), _data_iterator())
    _as_if_written_by_an_older_orbax(directory / "10" / "state")
    plain = ocp.CheckpointManager(
        str(directory), item_handlers={"state": ocp.StandardCheckpointHandler()}
    )
    wte = plain.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract())))[
        "state"
    ]["params"]["wte"]
    assert (np.asarray(wte.get_value()) == 0).all(axis=1).any()  # what this guards against
    plain.close()
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match=f"chunk {key} is missing .*read as zeros"
    ):
        checkpointer.restore(10, _abstract(), _data_iterator())
    # An intact step with the older metadata still restores (the check has no false alarm).
    _as_if_written_by_an_older_orbax(directory / "5" / "state")
    checkpointer.restore(5, _abstract(), _data_iterator())
    checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Params-only exports (from_pretrained): ours (OCDBT) and the converter's (plain zarr).


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    directory = tmp_path_factory.mktemp("exports")
    config = dbrx_jax.DbrxConfig.preset("dbrx-tiny", vocab_size=128, n_layers=2)
    hf_reference.hf_model(config, seed=3).save_pretrained(directory / "hf")
    convert.hf_to_jax(str(directory / "hf"), str(directory / "zarr"), progress=False)
    model = dbrx_jax.from_pretrained(directory / "zarr")
    checkpoint.export_params(nnx.state(model, nnx.Param), model.config, str(directory / "ocdbt"))
    return directory


def _zarr_chunk(params) -> str:
    return os.path.join(params, "blocks.ffn.w1.value", "1.3.0.0")


EXPORT_DAMAGE = {
    "ocdbt: array file deleted": ("ocdbt", lambda p: os.remove(_biggest_array_file(p))),
    "ocdbt: array file truncated": ("ocdbt", lambda p: _truncate(_biggest_array_file(p), 1000)),
    "ocdbt: chunk gone, older metadata": (
        "ocdbt",
        lambda p: (_remove_ocdbt_key(p, "lm_head.value"), _as_if_written_by_an_older_orbax(p)),
    ),
    "zarr: chunk deleted": ("zarr", lambda p: os.remove(_zarr_chunk(p))),
    "zarr: chunk truncated": ("zarr", lambda p: _truncate(_zarr_chunk(p), 10)),
    "zarr: chunk deleted, older metadata": (
        "zarr",
        lambda p: (os.remove(_zarr_chunk(p)), _as_if_written_by_an_older_orbax(p)),
    ),
    "_METADATA deleted": ("ocdbt", lambda p: os.remove(os.path.join(p, "_METADATA"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", EXPORT_DAMAGE)
def test_a_damaged_export_is_refused_not_zero_filled(exports, tmp_path, how):
    kind, damage = EXPORT_DAMAGE[how]
    export = tmp_path / kind
    shutil.copytree(exports / kind, export)
    damage(str(export / "params"))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=f"export {export} cannot be"):
        dbrx_jax.from_pretrained(export)


@pytest.mark.slow
def test_an_intact_export_with_older_metadata_still_loads(exports, tmp_path):
    for kind in ("ocdbt", "zarr"):
        shutil.copytree(exports / kind, tmp_path / kind)
        _as_if_written_by_an_older_orbax(tmp_path / kind / "params")
        dbrx_jax.from_pretrained(tmp_path / kind)


# ---------------------------------------------------------------------------------------------
# Training runs (train.train in-process; the permission test as a subprocess).


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained 4 steps with checkpoints at 2 and 4 (each test uses a copy)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train(_tiny_config(), str(workdir), progress=False)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _steps(workdir) -> list[int]:
    checkpointer = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    steps = checkpointer.steps()
    checkpointer.close()
    return steps


@pytest.mark.slow
def test_resume_after_a_corrupt_newest_step_saves_it_again_and_reruns(workdir):
    os.remove(_biggest_array_file(workdir / "checkpoints" / "4" / "state"))
    summary = train.train(_tiny_config(total_steps=6), str(workdir), progress=False)
    assert summary["loss_curve"][0][0] == 3  # resumed from step 2
    assert _steps(workdir) == [2, 4, 6]
    assert (workdir / "checkpoints" / "4.corrupt-1" / "state").is_dir()
    train.train(_tiny_config(total_steps=6), str(workdir), progress=False)  # a rerun: done
    assert _steps(workdir) == [2, 4, 6]


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes, error, match",
    [
        (
            {"optimizer": "lion"},
            checkpoint.ConfigMismatchError,
            r"/4 does not fit this run's state: opt_state/1/0/nu/.*"
            r"differs from the stored one in experiment.optimizer: 'adamw' -> 'lion'",
        ),
        (
            {"model.n_layers": 3},
            checkpoint.ConfigMismatchError,
            r"holds checkpoints of a different model \(n_layers: 2 -> 3\)",
        ),
        (
            {},  # both steps damaged: no step restores, and the run does not start over
            checkpoint.CheckpointCorruptError,
            r"no checkpoint in .* restores.*/4 cannot be restored.*/2 cannot be restored",
        ),
    ],
    ids=["optimizer", "architecture", "all corrupt"],
)
def test_a_refused_resume_changes_nothing_and_the_export_still_works(
    workdir, tmp_path, changes, error, match
):
    if not changes:
        for step in ("2", "4"):
            (workdir / "checkpoints" / step / "state" / "_METADATA").write_text("{garbage")
    before = _tree(workdir)
    with pytest.raises(error, match=match):
        train.train(_tiny_config(total_steps=6, **changes), str(workdir), progress=False)
    assert _tree(workdir) == before
    if changes:  # the intact checkpoints export, whatever workdir/config.json says
        (workdir / "config.json").write_text("{not the run's config")
        assert state.export_from_workdir(str(workdir), str(tmp_path / "export")) == 4
        assert dbrx_jax.from_pretrained(tmp_path / "export").config.n_layers == 2


@pytest.mark.slow
def test_an_old_checkpoint_without_its_config_exports_with_the_workdirs(workdir, tmp_path):
    shutil.rmtree(workdir / "checkpoints" / "4" / "config")
    assert state.export_from_workdir(str(workdir), str(tmp_path / "export")) == 4


def _unprivileged(tmp_path) -> list[str]:
    """A command prefix under which file permissions hold: none for a normal user; for root
    (who reads any file), setpriv dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root, which reads a chmod 000 file, and without setpriv")
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0)
    probe = subprocess.run([*prefix, "cat", str(secret)], capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("running as root, and setpriv could not drop the capability to read any file")
    return prefix


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_an_io_error_not_a_fallback(workdir, tmp_path):
    prefix = _unprivileged(tmp_path)
    step_dir = workdir / "checkpoints" / "4"
    os.chmod(step_dir, 0)
    try:
        before = sorted(os.listdir(workdir / "checkpoints"))
        command = helpers.command(
            "experiments/train.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--config.total_steps=6",
            "--config.checkpoint_every_steps=2",
            "--config.eval_every_steps=0",
        )
        result = subprocess.run(
            [*prefix, *command],
            cwd=helpers.ROOT,
            env=helpers.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        assert f"{step_dir} cannot be read" in result.stderr
        assert "Permission denied" in result.stderr
        assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing moved aside
    finally:
        os.chmod(step_dir, 0o755)
    assert _steps(workdir) == [2, 4]


@pytest.mark.slow
def test_an_eval_split_without_a_batch_fails_before_the_first_step(trained, tmp_path):
    source = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"A short document {i}."}) for i in range(30)]
    source.write_text("\n".join(lines) + "\n")  # the eval split: document 0, a few tokens
    config = _tiny_config(eval_every_steps=2)
    config.data.source = f"jsonl:{source}"
    config.data.tokenizer = str(trained / "spm_1024.model")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"yields no full batch.*config.data.eval_fraction"):
        train.train(config, str(workdir), progress=False)
    assert not os.path.exists(workdir / "config.json")
    assert not os.path.exists(workdir / "metrics.jsonl")  # no step ran
    assert not os.path.exists(workdir / "checkpoints")


@pytest.mark.slow
def test_a_failing_evaluation_saves_the_state_first(workdir, monkeypatch):
    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train, "evaluate", failing_evaluate)
    config = _tiny_config(total_steps=5, checkpoint_every_steps=2, eval_every_steps=5)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.train(config, str(workdir), progress=False)
    assert _steps(workdir) == [2, 4, 5]  # step 5, the last, reached the disk
