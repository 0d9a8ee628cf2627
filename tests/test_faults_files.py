"""Faults against the files a user hands us and the outputs we write (io/files.py's rules):
reads that could leave the input, outputs that could destroy an input or something else, a
damaged export that must not convert to zeros, leftovers of interrupted writes, and the path a
trained model takes to transformers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import dbrx_jax
from benchmarks import hf_reference
from dbrx_jax import DbrxConfig
from dbrx_jax.io import checkpoint, convert, files
from dbrx_jax.io.safetensors import SafetensorsCheckpoint
from dbrx_jax.model import Dbrx
from tests import helpers

CONFIG = DbrxConfig.preset("dbrx-tiny", vocab_size=128, n_layers=2)
TOKENS = np.random.RandomState(0).randint(0, 128, (2, 9)).astype(np.int32)


def _tree(directory) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what "nothing was lost" compares."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def hf_dir(tmp_path):
    hf_reference.hf_model(CONFIG, seed=1).save_pretrained(tmp_path / "hf", max_shard_size="150KB")
    return tmp_path / "hf"


@pytest.fixture
def export_dir(tmp_path):
    model = Dbrx(CONFIG, rngs=nnx.Rngs(0))
    checkpoint.export_params(nnx.state(model, nnx.Param), CONFIG, str(tmp_path / "export"))
    return tmp_path / "export"


# ---------------------------------------------------------------------------------------------
# 1. The path from training to transformers.


@pytest.mark.slow
def test_training_exports_convert_to_hf_with_the_same_logits(export_dir, tmp_path):
    """export_params writes OCDBT; jax_to_hf reads it (and hf_to_jax's plain zarr, tested in
    test_convert.py) and transformers' reading gives our logits."""
    ours = dbrx_jax.from_pretrained(export_dir)
    convert.jax_to_hf(str(export_dir), str(tmp_path / "hf"), progress=False)
    np.testing.assert_array_equal(
        dbrx_jax.from_pretrained(tmp_path / "hf")(TOKENS).logits, ours(TOKENS).logits
    )
    loaded = transformers.DbrxForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_reference.without_clip_crash(loaded)
        reference = loaded(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(TOKENS).logits), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_train_export_convert_transformers_on_the_command_line(tmp_path):
    workdir, export, hf = tmp_path / "run", tmp_path / "export", tmp_path / "hf"
    helpers.run(
        "experiments/train.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.total_steps=3",
        "--config.checkpoint_every_steps=3",
        "--config.eval_every_steps=0",
    )
    helpers.run("experiments/export.py", f"--workdir={workdir}", f"--output={export}")
    before = _tree(workdir)
    for output, match in [
        (workdir, "overlaps the input"),
        (workdir / "checkpoints" / "3", "overlaps the input"),
        (export, "pass --overwrite"),
    ]:
        result = helpers.run(
            "experiments/export.py", f"--workdir={workdir}", f"--output={output}", check=False
        )
        assert result.returncode == 1 and match in result.stderr, result.stderr[-2000:]
    assert _tree(workdir) == before
    helpers.run(
        "experiments/convert.py", "--direction=jax_to_hf", f"--input={export}", f"--output={hf}"
    )
    ours = dbrx_jax.from_pretrained(export)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) * 7
    loaded = transformers.DbrxForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        hf_reference.without_clip_crash(loaded)
        reference = loaded(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(tokens).logits), reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# 2. Nothing is read from outside the input.


@pytest.mark.parametrize(
    "name",
    ["../secret.safetensors", "/etc/passwd", "sub/../../secret.safetensors", "..", "", "a\x00b"],
)
def test_index_names_outside_the_directory_are_refused(hf_dir, tmp_path, name):
    (tmp_path / "secret.safetensors").write_bytes(b"\xff" * 64)
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match="model.safetensors.index.json: .*(points outside|not a file name)"
    ):
        SafetensorsCheckpoint(hf_dir)
    with pytest.raises(ValueError, match="index.json"):
        convert.hf_to_jax(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "found a JSON list"),
        ('{"weight_map": 3}', "weight_map"),
    ],
)
def test_a_bad_index_names_the_file(hf_dir, content, match):
    (hf_dir / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: .*{match}"):
        SafetensorsCheckpoint(hf_dir)


def test_member_keeps_plain_names():
    assert files.member("/d", "model-00001-of-00002.safetensors", "i") == (
        "/d/model-00001-of-00002.safetensors"
    )
    assert files.member("/d", "./sub/x.safetensors", "i") == "/d/sub/x.safetensors"
    for bad in ("C:/x", "\\\\server\\x", "a/../../b", 3, None):
        with pytest.raises(ValueError, match="^i: "):
            files.member("/d", bad, "i")


# ---------------------------------------------------------------------------------------------
# 3. Nothing the user asked to keep is destroyed.


def test_an_output_overlapping_the_input_is_refused_even_with_overwrite(hf_dir, export_dir):
    before_hf, before_export = _tree(hf_dir), _tree(export_dir)
    for output in (hf_dir, hf_dir.parent, hf_dir / "model.safetensors.index.json"):
        with pytest.raises(ValueError, match="overlaps the input"):
            convert.hf_to_jax(str(hf_dir), str(output), overwrite=True, progress=False)
    for output in (export_dir, export_dir / "params", export_dir.parent):
        with pytest.raises(ValueError, match="overlaps the input"):
            convert.jax_to_hf(str(export_dir), str(output), overwrite=True, progress=False)
    link = hf_dir.parent / "link"
    link.symlink_to(hf_dir)
    with pytest.raises(ValueError, match="overlaps the input"):
        convert.hf_to_jax(str(hf_dir), str(link), overwrite=True, progress=False)
    assert _tree(hf_dir) == before_hf and _tree(export_dir) == before_export
    assert not [p for p in os.listdir(hf_dir.parent) if p.endswith(".partial")]


def test_overwrite_replaces_only_an_output_of_the_same_kind(hf_dir, export_dir, tmp_path):
    params = nnx.state(Dbrx(CONFIG, rngs=nnx.Rngs(1)), nnx.Param)
    before = _tree(hf_dir)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        checkpoint.export_params(params, CONFIG, str(hf_dir))
    with pytest.raises(FileExistsError, match="is not a dbrx_jax export .*config.json"):
        checkpoint.export_params(params, CONFIG, str(hf_dir), overwrite=True)
    assert _tree(hf_dir) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "results.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a Hugging Face checkpoint .*results.txt"):
        convert.jax_to_hf(str(export_dir), str(other), overwrite=True, progress=False)
    with pytest.raises(FileExistsError, match="is not a directory"):
        convert.jax_to_hf(str(export_dir), str(other / "results.txt"), progress=False)
    assert (other / "results.txt").read_text() == "keep me"
    # An export over an export: only when asked, and then the new parameters are there.
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        checkpoint.export_params(params, CONFIG, str(export_dir))
    checkpoint.export_params(params, CONFIG, str(export_dir), overwrite=True)
    reloaded = dbrx_jax.from_pretrained(export_dir)
    np.testing.assert_array_equal(reloaded.wte[...], params["wte"].get_value())
    # An empty directory is used as it is.
    (tmp_path / "empty").mkdir()
    convert.jax_to_hf(str(export_dir), str(tmp_path / "empty"), progress=False)
    assert (tmp_path / "empty" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["empty", "export", "hf", "notes"]


def test_a_directory_that_is_both_kinds_is_refused(hf_dir, export_dir):
    shutil.copy(export_dir / checkpoint.EXPORT_CONFIG, hf_dir)
    with pytest.raises(ValueError, match="holds both a dbrx_jax export .* and a Hugging Face"):
        dbrx_jax.from_pretrained(hf_dir)


# ---------------------------------------------------------------------------------------------
# 4. Damage is an error, never zeros.


def _damage(export, how):
    params = export / "params"
    if how == "ocdbt data file":
        victim = max((params / "d").iterdir(), key=lambda p: p.stat().st_size)
        victim.unlink()
    elif how == "ocdbt data file truncated":
        victim = max((params / "d").iterdir(), key=lambda p: p.stat().st_size)
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    elif how == "zarr chunk":
        (params / "blocks.ffn.w1.value" / "1.3.0.0").unlink()
    elif how == "zarr chunk truncated":
        chunk = params / "blocks.ffn.w2.value" / "0.0.0.0"
        with open(chunk, "r+b") as f:
            f.truncate(10)
    elif how == "zarr array":
        shutil.rmtree(params / "lm_head.value")


@pytest.mark.parametrize(
    "how",
    [
        "ocdbt data file",
        "ocdbt data file truncated",
        "zarr chunk",
        "zarr chunk truncated",
        "zarr array",
    ],
)
def test_a_damaged_export_does_not_convert(hf_dir, export_dir, tmp_path, how):
    if how.startswith("zarr"):
        export_dir = tmp_path / "plain"  # hf_to_jax's layout: plain zarr, one expert a chunk
        convert.hf_to_jax(str(hf_dir), str(export_dir), progress=False)
    _damage(export_dir, how)
    with pytest.raises(ValueError, match=f"{export_dir}.*(damaged export|missing or unreadable)"):
        convert.jax_to_hf(str(export_dir), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------------------------
# 7. Leftovers of interrupted writes.


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(export_dir, tmp_path):
    out = tmp_path / "out"
    convert.jax_to_hf(str(export_dir), str(out), progress=False)
    before = _tree(out)
    kind = files.OutputKind("a test output", lambda path: True)
    for error in (RuntimeError("disk full"), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(error)):
            with files.output_directory(out, inputs=[], kind=kind, overwrite=True) as partial:
                (tmp_path / "out.partial" / "half-written").write_bytes(b"x")
                assert partial == str(out) + ".partial"
                raise error
        assert _tree(out) == before
        assert sorted(os.listdir(tmp_path)) == ["export", "out"]


def test_a_partial_directory_left_by_a_killed_writer_is_removed_by_the_next(export_dir, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / "out.partial"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stale / ".writer").write_text(f"{socket.gethostname()} {dead.pid}")
    convert.jax_to_hf(str(export_dir), str(out), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["export", "out"]
    assert not (out / "model-00001-of-00002.safetensors").exists()  # one shard: not the stale one


def test_a_partial_directory_whose_writer_runs_is_left_alone(export_dir, tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / ".writer").write_text(f"{socket.gethostname()} {os.getppid()}")
    with pytest.raises(FileExistsError, match="another process on this host is writing"):
        convert.jax_to_hf(str(export_dir), str(tmp_path / "out"), progress=False)
    assert os.listdir(partial) == [".writer"]


@pytest.fixture
def terminate():
    """A termination request, as dbrx_jax.cli's SIGTERM handler makes it; cleared afterwards."""
    yield files.request_termination
    files.TERMINATING.clear()


def test_a_termination_request_waits_for_the_end_of_a_deferred_step(terminate):
    steps = []
    with pytest.raises(SystemExit) as stop:
        with files.termination_deferred():
            with files.termination_deferred():
                terminate()
                steps.append("inner")
            steps.append("outer")
        steps.append("after")
    assert stop.value.code == 143
    assert steps == ["inner", "outer"]
    with pytest.raises(SystemExit):
        terminate()  # outside a deferred step: at once


@pytest.mark.parametrize("step", ["placeholder save", "zarr array", "export save"])
def test_sigterm_inside_a_library_write_lets_it_finish_then_removes_the_output(
    hf_dir, tmp_path, monkeypatch, terminate, step
):
    """An exception raised while the main thread waits on Orbax or tensorstore leaves their
    threads writing into the partial directory as it is removed: the request waits instead."""
    owner, name = {
        "placeholder save": (convert.ocp.Checkpointer, "save"),
        "zarr array": (convert.ts, "open"),
        "export save": (checkpoint.ocp.StandardCheckpointer, "save"),
    }[step]
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        first = not calls and sys._getframe(1).f_globals["__name__"].startswith("dbrx_jax.")
        if first:  # our first call, not Orbax's own use of tensorstore
            calls.append("interrupted")
            terminate()
        result = original(*args, **kwargs)
        if first:
            calls.append("finished")
        return result

    monkeypatch.setattr(owner, name, interrupted)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        if step == "export save":
            model = Dbrx(CONFIG, rngs=nnx.Rngs(0))
            checkpoint.export_params(nnx.state(model, nnx.Param), CONFIG, str(out))
        else:
            convert.hf_to_jax(str(hf_dir), str(out), progress=False)
    assert stop.value.code == 143
    assert calls == ["interrupted", "finished"]
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.slow
def test_sigterm_during_a_conversion_removes_its_partial_output(hf_dir, tmp_path):
    out = tmp_path / "out"
    proc = helpers.start(
        "experiments/convert.py", "--direction=hf_to_jax", f"--input={hf_dir}", f"--output={out}"
    )
    deadline = time.time() + 120
    while not (tmp_path / "out.partial").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# ---------------------------------------------------------------------------------------------
# Command-line errors: one line naming what was wrong.


@pytest.mark.slow
def test_command_line_errors_are_one_line(hf_dir, tmp_path):
    cases = [
        (
            ("experiments/convert.py", "--direction=hf_to_jax", f"--input={tmp_path / 'nope'}"),
            "nope: no such directory",
        ),
        (
            ("experiments/convert.py", "--direction=hf_to_jax", f"--input={hf_dir}"),
            "overlaps the input",
        ),
        (("experiments/export.py", f"--workdir={tmp_path}"), "config.json"),
    ]
    outputs = {0: [f"--output={hf_dir}", "--overwrite"], 1: [f"--output={hf_dir}", "--overwrite"]}
    outputs[2] = [f"--output={tmp_path / 'e'}"]
    for i, (args, match) in enumerate(cases):
        result = helpers.run(*args, *outputs[i], check=False, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, result.stderr[-2000:]
        assert len(lines) == 1 and "error: " in lines[0] and match in lines[0], result.stderr
    verbose = helpers.run(*cases[0][0], *outputs[0], "-v", "1", check=False, timeout=300)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    for override, match in [
        ("--config.no_such_key=1", "--config.no_such_key: the config has no key 'no_such_key'"),
        ("--config.model.gmm_impl=ragged_dot", "did you mean 'moe_gmm_impl'?"),
        ("--config.seq_len=100000", "config.seq_len=100000: expected at most the model's"),
    ]:
        result = helpers.run(
            "experiments/train.py",
            "--config=configs/tiny.py",
            f"--workdir={tmp_path / 'run'}",
            override,
            check=False,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and match in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
