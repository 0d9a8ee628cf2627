"""Every config file loads into a valid model config; the entry points run."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dbrx_jax import DbrxConfig, experiment, sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


def test_there_are_configs():
    assert {p.name for p in CONFIG_FILES} >= {"tiny.py", "demo.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_file_loads(path):
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    experiment.validate(config)
    assert experiment.model_config(config.model).num_params() > 0
    sharding.make_mesh(dict(config.mesh))  # fits the 8 test devices


def test_model_info_runs_with_an_override():
    result = subprocess.run(
        [
            sys.executable,
            "experiments/model_info.py",
            "--config=configs/tiny.py",
            "--config.model.n_layers=3",
            "--time",
            "--seq_len=16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["config"]["n_layers"] == 3
    assert report["params"] == DbrxConfig.preset("dbrx-tiny", n_layers=3).num_params()
    assert report["step_s"] > 0


def test_model_info_rejects_unknown_flags():
    result = subprocess.run(
        [sys.executable, "experiments/model_info.py", "--config=configs/tiny.py", "--nope=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "nope" in result.stderr


def test_bench_moe_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "experiments/bench_moe.py",
            "--tokens=64",
            "--d_model=16",
            "--ffn=24",
            "--iters=1",
            "--impls=dense,dropless,capacity",
            f"--json_out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "fwd+bwd ms" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["matmul (ceiling)"] + ["dense", "dropless", "capacity"] * 2
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)


def _smoke_env(out_dir) -> dict[str, str]:
    """The environment of a GPU script's SMOKE=1 mode, with this interpreter's python3 first."""
    return {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(out_dir),
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def test_gpu_bench_script_smoke_mode(tmp_path):
    env = _smoke_env(tmp_path)
    subprocess.run(
        ["bash", "experiments/gpu_bench_moe.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = json.loads((tmp_path / "bench_moe.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"matmul (ceiling)", "dense", "dropless", "capacity"}


def test_gpu_check_script_smoke_mode(tmp_path):
    """The one-run GPU throughput check, on CPU at dbrx-tiny size: every part runs and writes
    its report (with the transformers comparison and the step profile). Its GPU-tests part is
    left out: on CPU it would only rerun tests of this suite."""
    env = {**_smoke_env(tmp_path), "PARTS": "fast capacity remat generate"}
    result = subprocess.run(
        ["bash", "experiments/gpu_check.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (tmp_path / "summary.txt").read_text()
    fast = json.loads((tmp_path / "train_fast.json").read_text())
    assert fast["hf"]["tokens_per_s"] > 0 and fast["speedup"] > 0
    assert fast["ours"]["profile"]["ms_per_step"]["expert GEMMs"] > 0
    assert json.loads((tmp_path / "train_remat.json").read_text())["knobs"]["remat_policy"] == (
        "matmuls"
    )
    assert (tmp_path / "train_capacity.json").exists()
    assert json.loads((tmp_path / "generate.json").read_text())["decode_speedup"][0] > 0


def test_bench_train_compares_with_transformers():
    result = subprocess.run(
        [
            sys.executable,
            "experiments/bench_train.py",
            "--preset=dbrx-tiny",
            "--batch_size=8",
            "--seq_len=16",
            "--iters=1",
            "--compare_hf",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["ours"]["tokens_per_s"] > 0 and report["hf"]["tokens_per_s"] > 0
    assert report["speedup"] > 0


def test_bench_generate_compares_with_transformers():
    result = subprocess.run(
        [
            sys.executable,
            "experiments/bench_generate.py",
            "--preset=dbrx-tiny",
            "--batches=1,4",
            "--prompt_len=8",
            "--new_tokens=8",
            "--compare_hf",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert [row["batch"] for row in report["ours"]] == [1, 4]
    assert all(row["decode_tokens_per_s"] > 0 for row in report["ours"] + report["hf"])
    assert len(report["decode_speedup"]) == 2
