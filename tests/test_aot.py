"""Compiling for TPU slices on this CPU host (libtpu's compiler, compile-only devices): slice
names, meshes laid on the physical torus, the trainer's and generator's programs for small
slices, the report, the out-of-memory answer and the sweep."""

import json
import logging

import numpy as np
import optax
import pytest

from dbrx_jax import experiment, sharding, state
from dbrx_jax.aot import analysis
from dbrx_jax.aot import compile as aot
from dbrx_jax.aot.topology import parse_target, slice_targets, torus_shape
from tests import helpers

try:
    parse_target("v5p-8").devices()
except ValueError as e:  # libtpu is in the test extra; without it there is nothing to compile for
    pytest.skip(f"libtpu cannot describe TPU slices here: {e}", allow_module_level=True)


def _config(preset="dbrx-tiny", batch=8, seq=64, **model):
    config = experiment.base_config()
    config.unlock()
    config.model = experiment.model_section(preset, vocab_size=1024, **model)
    config.lock()
    config.batch_size, config.seq_len = batch, seq
    config.warmup_steps = 0
    config.mesh.update({"data": 1, "fsdp": 2, "expert": 2, "tensor": 1})
    return config


@pytest.mark.parametrize(
    "name, topology, chips",
    [
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v5p-256", "v5p:4x4x8", 128),
        ("v4-32", "v4:2x2x4", 16),
        ("v5e-256", "v5e:16x16", 256),
        ("v6e-16", "v6e:4x4", 16),
        ("v6e-32", "v6e:4x8", 32),
        ("tpu7x-16", "tpu7x:2x2x2", 8),
        ("V5P:4x4x8", "v5p:4x4x8", 128),
    ],
)
def test_slice_names_follow_each_generations_counting(name, topology, chips):
    target = parse_target(name)
    assert (target.topology, target.chips) == (topology, chips)


@pytest.mark.parametrize(
    "name, match",
    [("v5p-7", "count TensorCores"), ("v9-8", "expected a slice name"), ("v5p:4x4", "3D tori"),
     ("v6e-48", "not a power of two")],
)  # fmt: skip
def test_bad_slice_names_say_what_was_expected(name, match):
    with pytest.raises(ValueError, match=f"--topology='{name}'.*{match}"):
        parse_target(name)


def test_torus_shapes():
    assert torus_shape(512, 3) == (8, 8, 8) and torus_shape(2048, 3) == (8, 16, 16)
    assert torus_shape(8, 2) == (2, 4) and torus_shape(4, 3) == (2, 2, 1)


def test_meshes_lie_on_whole_physical_axes_and_split_only_when_they_must(caplog):
    devices = parse_target("v5p-128").devices()
    with caplog.at_level(logging.WARNING, logger="dbrx_jax.sharding"):
        whole = sharding.make_mesh({"fsdp": 4, "expert": 16}, devices=devices)
    assert not caplog.records
    coords = np.array([[d.coords for d in row] for row in whole.devices[0, :, :, 0]])
    # Each fsdp group (fixed expert index) runs along one physical axis.
    assert all(len({tuple(c) for c in coords[:, e]}) == 4 for e in range(16))
    with caplog.at_level(logging.WARNING, logger="dbrx_jax.sharding"):
        split = sharding.make_mesh({"fsdp": 8, "expert": 8}, devices=devices)
    assert dict(split.shape) == {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1}
    assert "physical axis is split" in caplog.text and "4x4x4" in caplog.text


def test_multi_slice_meshes_put_data_over_dcn():
    devices = parse_target("v5p-8", num_slices=2).devices()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2}, devices=devices)
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ValueError, match="2 slices; the data axis .* multiple of 2"):
        sharding.make_mesh({"data": 1, "fsdp": 4, "expert": 2}, devices=devices)


@pytest.mark.parametrize(
    "step", [pytest.param("train", marks=pytest.mark.slow), "prefill", "decode"]
)
def test_each_program_compiles_for_a_small_slice_and_reports(step):
    report = aot.compile_report(_config(), parse_target("v5p-8"), step)
    assert report["fits"] and 0 < report["memory"]["total"] < report["memory"]["hbm"]
    assert report["memory"]["parameters"] > 0
    assert report["flops"]["ours_per_device"] > 0 and report["flops"]["xla_per_device"] > 0
    assert report["roofline"]["step_s_bound"] > 0
    kinds = {c["kind"] for c in report["collectives"]}
    assert "all-gather" in kinds  # fsdp gathers each layer's weights
    assert all(
        c["axes"] is None or set(c["axes"]) <= {"fsdp", "expert"} for c in report["collectives"]
    )
    text = aot.format_report(report)
    assert "per device:" in text and "roofline BOUND" in text
    json.dumps(report, default=str)


@pytest.mark.slow
def test_the_train_step_compiles_for_v6e_with_expert_parallelism_and_never_gathers_experts():
    config = _config()
    config.mesh.expert = 4
    program, _ = aot.build_program(config, parse_target("v6e-8"), "train")
    hlo = program.fn.lower(*program.args).compile().as_text()
    c = experiment.model_config(config.model)
    E, D, F = c.moe_num_experts, c.d_model, c.ffn_hidden_size
    assert analysis.gathered_arrays(hlo, [(E, D, F), (E, F, D), (1, E, D, F), (1, E, F, D)]) == []


@pytest.mark.slow
def test_collectives_per_layer_do_not_grow_with_depth():
    sites = []
    for layers in (2, 4):
        report = aot.compile_report(_config(n_layers=layers), parse_target("v5p-8"), "train")
        sites.append(sorted((c["kind"], str(c["axes"]), c["sites"]) for c in report["collectives"]))
    assert sites[0] == sites[1]


@pytest.mark.slow
def test_out_of_memory_is_a_one_screen_answer():
    config = _config(batch=512, seq=2048, max_seq_len=2048)
    report = aot.compile_report(config, parse_target("v5e-4"), "train")
    assert not report["fits"]
    oom = report["out_of_memory"]
    assert oom["needed"] > oom["hbm"] == 16 * 2**30
    text = aot.format_report(report)
    assert "OUT OF MEMORY" in text and "What to change" in text and "grad_accum_steps" in text
    assert len(text.splitlines()) < 30


@pytest.mark.slow
def test_the_sweep_lists_what_fits_best_bound_first():
    reports = aot.sweep(_config(), parse_target("v5p-8"), "train", limit=4)
    assert reports and all(r["fits"] for r in reports)
    bounds = [r["roofline"]["step_s_bound"] for r in reports]
    assert bounds == sorted(bounds)
    assert "mesh (data,fsdp,expert,tensor)" in aot.fits_summary(reports)


def test_candidate_meshes_divide_the_model():
    meshes = aot.candidate_meshes(8, experts=16, kv_heads=8, batch=8)
    assert {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1} in meshes
    assert all(16 % m["expert"] == 0 and 8 % m["tensor"] == 0 for m in meshes)
    assert all(np.prod(list(m.values())) == 8 for m in meshes)


@pytest.mark.slow
def test_command_line(tmp_path):
    result = helpers.run(
        "experiments/aot_compile.py",
        "--config=configs/tiny.py",
        "--topology=v5p-8",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--config.mesh.expert=2",
        "--step=decode",
        f"--output_json={tmp_path / 'report.json'}",
    )
    assert "decode step of dbrx-tiny for v5p-8" in result.stdout
    assert "WARNING" not in result.stderr, result.stderr[-2000:]
    assert json.loads((tmp_path / "report.json").read_text())["fits"] is True
    bad = helpers.run(
        "experiments/aot_compile.py", "--config=configs/tiny.py", "--topology=v5p-7", check=False
    )
    assert bad.returncode == 1 and "--topology='v5p-7'" in bad.stderr
    alone = helpers.run(
        "experiments/aot_compile.py", "--config=configs/tiny.py", "--topology=v5e", check=False
    )
    assert alone.returncode == 1 and "a generation alone is searched with --sweep" in alone.stderr


@pytest.mark.slow
def test_the_slice_search_stops_at_the_smallest_slice_that_holds_the_step():
    # A KV cache of 32 GiB (fp32, 1024 x 65536 slots): one or two 16 GiB v5e chips cannot hold
    # it, which is known from the arguments alone, without compiling; four can.
    config = _config(batch=1024, seq=65536, max_seq_len=65536)
    rows = aot.smallest_slice(config, "v5e", "decode")
    assert [(r["slice"], r["verdict"]) for r in rows] == [
        ("v5e-1", "arguments exceed HBM"),
        ("v5e-2", "arguments exceed HBM"),
        ("v5e-4", "fits"),
    ]
    assert rows[0]["needed"] > 2 * rows[0]["hbm"] and rows[0]["report"] is None
    assert rows[-1]["report"]["fits"] and rows[-1]["report"]["memory"]["headroom"] > 0
    assert "smallest slice: v5e-4" in aot.slices_summary(rows)


def test_a_generation_lists_its_slices_smallest_first():
    assert [t.name for t in slice_targets("v6e")][:3] == ["v6e-1", "v6e-2", "v6e-4"]
    assert [t.name for t in slice_targets("v5p")][:2] == ["v5p-8", "v5p-16"]
    assert slice_targets("v5p")[-1].chips == 8192 and slice_targets("v5e")[-1].chips == 256
    with pytest.raises(ValueError, match="expected a generation"):
        slice_targets("v9")


@pytest.mark.slow
def test_a_qlora_train_step_compiles_with_the_base_as_stored():
    """Adapters compile through the TPU kernels; a 4-bit base is counted as stored."""
    config = _config(lora_rank=8, lora_targets="attn.*,ffn.*", quant_bits=4)
    report = aot.compile_report(config, parse_target("v5p-8"), "train")
    assert report["fits"]
    plain = experiment.model_config(config.model).replace(quant_bits=0)
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=parse_target("v5p-8").devices())
    *_, (dense,) = state.abstract_train_state(plain, optax.adamw(1e-3), mesh)
    assert report["memory"]["frozen base"] < 0.6 * analysis.device_bytes(dense)
