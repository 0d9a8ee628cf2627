"""The benchmarks' entry points run (as `python -m benchmarks.<name>` from the repository root, on
the 8 simulated CPU devices) and report what they promise; the GPU scripts run in SMOKE mode."""

import json
import pathlib
import subprocess
import sys

import pytest

from dbrx_jax import DbrxConfig, memory
from tests import helpers

pytestmark = pytest.mark.slow  # subprocesses that compile models


def test_model_info_runs_with_an_override():
    result = helpers.run(
        "benchmarks.model_info",
        "--config=configs/tiny.py",
        "--config.model.n_layers=3",
        "--config.seq_len=16",
        "--time",
        timeout=300,
    )
    report = json.loads(result.stdout)
    assert report["config"]["n_layers"] == 3
    assert report["params"] == DbrxConfig.preset("dbrx-tiny", n_layers=3).num_params()
    assert report["seq_len"] == 16
    assert report["step_s"] > 0


def test_model_info_rejects_unknown_flags():
    result = helpers.run(
        "benchmarks.model_info", "--config=configs/tiny.py", "--nope=1", timeout=300, check=False
    )
    assert result.returncode != 0 and "nope" in result.stderr


def test_mesh_report_matches_memory_per_device():
    """The 132B release on a 64-device mesh, from shapes alone: the figures are the library's."""
    result = helpers.run(
        "benchmarks.mesh_report",
        "--config.model.preset=dbrx-132b",
        "--meshes=fsdp=8,expert=8",
        timeout=300,
    )
    (row,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    sizes = {"fsdp": 8, "expert": 8}
    expected = memory.memory_per_device(DbrxConfig.preset("dbrx-132b"), sizes)
    assert row == {"mesh": sizes, **expected}
    assert row["devices"] == 64 and row["optimizer_gib"] > row["params_gib"] > 0


def test_bench_moe_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = helpers.run(
        "benchmarks.bench_moe",
        "--config=configs/bench.py:dbrx-tiny",
        "--config.model.d_model=16",
        "--config.model.ffn_hidden_size=24",
        "--tokens=64",
        "--iters=1",
        "--impls=dense,dropless,capacity",
        f"--json_out={out}",
        timeout=300,
    )
    assert "fwd+bwd ms" in result.stdout
    report = json.loads(out.read_text())
    assert report["setup"]["d_model"] == 16 and report["setup"]["ffn"] == 24
    rows = report["rows"]
    assert [r["impl"] for r in rows] == ["matmul (ceiling)"] + ["dense", "dropless", "capacity"] * 2
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)


def _smoke_env(out_dir) -> dict[str, str]:
    """The environment of a GPU script's SMOKE=1 mode, with this interpreter's python3 first."""
    path = f"{pathlib.Path(sys.executable).parent}:{helpers.env()['PATH']}"
    return helpers.env(SMOKE="1", OUT=str(out_dir), PATH=path)


def test_gpu_bench_script_smoke_mode(tmp_path):
    subprocess.run(
        ["bash", "benchmarks/gpu_bench_moe.sh"],
        cwd=helpers.ROOT,
        env=_smoke_env(tmp_path),
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
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=helpers.ROOT,
        env={**_smoke_env(tmp_path), "PARTS": "fast capacity remat generate"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (tmp_path / "summary.txt").read_text()
    fast = json.loads((tmp_path / "train_fast.json").read_text())
    assert fast["hf"]["tokens_per_s"] > 0 and fast["speedup"] > 0
    assert fast["ours"]["profile"]["ms_per_step"]["expert GEMMs"] > 0
    assert fast["knobs"]["moe_fuse_gate_up"] is True
    assert json.loads((tmp_path / "train_remat.json").read_text())["knobs"]["remat_policy"] == (
        "matmuls"
    )
    capacity = json.loads((tmp_path / "train_capacity.json").read_text())
    assert capacity["knobs"]["moe_impl"] == "capacity"
    assert json.loads((tmp_path / "generate.json").read_text())["decode_speedup"][0] > 0


def test_bench_train_compares_with_transformers():
    result = helpers.run(
        "benchmarks.bench_train",
        "--config=configs/bench.py:dbrx-tiny",
        "--config.batch_size=8",
        "--config.seq_len=16",
        "--iters=1",
        "--compare_hf",
    )
    report = helpers.json_report(result.stdout)
    assert report["ours"]["tokens_per_s"] > 0 and report["hf"]["tokens_per_s"] > 0
    assert report["speedup"] > 0
    assert (report["preset"], report["batch"], report["seq_len"]) == ("dbrx-tiny", 8, 16)
    assert report["devices"] == 8 and report["knobs"]["dtype"] == "float32"


def test_bench_forward_compares_with_transformers_on_the_same_weights():
    result = helpers.run(
        "benchmarks.bench_forward",
        "--config=configs/bench.py:dbrx-tiny",
        "--config.batch_size=2",
        "--config.seq_len=16",
        "--iters=1",
    )
    report = helpers.json_report(result.stdout)
    assert report["ours_ms"] > 0 and report["hf_ms"] > 0 and report["speedup"] > 0
    assert report["max_abs_logit_diff"] < 1e-4  # the same weights, the same logits
    assert (report["preset"], report["batch"], report["seq_len"]) == ("dbrx-tiny", 2, 16)


def test_bench_generate_compares_with_transformers():
    result = helpers.run(
        "benchmarks.bench_generate",
        "--config=configs/bench.py:dbrx-tiny",
        "--batches=1,4",
        "--prompt_len=8",
        "--new_tokens=8",
        "--compare_hf",
    )
    report = helpers.json_report(result.stdout)
    assert [row["batch"] for row in report["ours"]] == [1, 4]
    assert all(row["decode_tokens_per_s"] > 0 for row in report["ours"] + report["hf"])
    assert len(report["decode_speedup"]) == 2


def test_bench_convert_smoke(tmp_path):
    result = helpers.run(
        "benchmarks.bench_convert",
        "--config=configs/bench.py:dbrx-tiny",
        "--config.model.n_layers=2",
        f"--workdir={tmp_path}",
        timeout=300,
    )
    report = helpers.json_report(result.stdout)
    assert report["round_trip_bitwise"] is True  # random bits, NaN payloads included
    assert report["hf_to_jax"]["peak_rss_gib"] > 0 and report["copy"]["MB_per_s"] > 0
