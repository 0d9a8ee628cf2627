"""The step-time breakdown: HLO parsing, scope attribution, and a real trace of a train step."""

import numpy as np
import optax
import pytest

from benchmarks import profiling, timing
from dbrx_jax import DbrxConfig, data, sharding, state, train

HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %fusion.3 = f32[8,16]{1,0} fusion(f32[8]{0} %x), kind=kLoop, calls=%f, metadata={op_name="jit(step)/while/body/closed_call/transpose(jvp(expert_gemm))/dot_general"}
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %while.1 = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/while"}
  %all-reduce-start.2 = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %g), channel_id=1, to_apply=%add
  %sort.7 = (s32[64]{0}, s32[64]{0}) sort(%a, %b), dimensions={0}, metadata={op_name="jit(step)/jvp(permute)/sort"}
  %fusion.9 = f32[8]{0} fusion(%p), kind=kLoop, calls=%g, metadata={op_name="jit(step)/optimizer/mul"}
  %fusion.10 = f32[8]{0} fusion(%p), kind=kLoop, calls=%h, metadata={op_name="jit(step)/attention_mask/add"}
  ROOT %r = f32[8]{0} add(%fusion.9, %fusion.10), metadata={op_name="jit(step)/add"}
}
"""  # noqa: E501 (compiled HLO lines are long)


def test_hlo_instructions_and_categories():
    instructions = profiling.hlo_instructions(HLO)
    assert profiling.module_name(HLO) == "jit_step"
    assert instructions["fusion.3"][0] == "fusion"
    assert instructions["sort.7"] == ("sort", "jit(step)/jvp(permute)/sort")
    assert instructions["all-reduce-start.2"][0] == "all-reduce-start"
    categories = {name: profiling.category(*inst) for name, inst in instructions.items()}
    assert categories["fusion.3"] == "expert GEMMs"  # through transpose(jvp(...))
    assert categories["while.1"] is None  # encloses other ops: not counted
    assert categories["all-reduce-start.2"] == "collectives"
    assert categories["sort.7"] == "routing + permutation"
    assert categories["fusion.9"] == "optimizer"
    assert categories["fusion.10"] == "other"  # a scope name inside a longer word is not it
    assert categories["r"] == "other"


def test_breakdown_sums_by_category():
    op_ns = {"fusion.3": 4e6, "sort.7": 2e6, "fusion.9": 1e6, "while.1": 9e6, "gone.1": 5e6}
    result = profiling.breakdown(op_ns, HLO, steps=1)
    assert result["ms_per_step"]["expert GEMMs"] == 4.0
    assert result["ms_per_step"]["routing + permutation"] == 2.0
    assert result["op_ms_per_step"] == 7.0  # the while loop's 9 ms are its body's ops
    assert result["unmatched_ms_per_step"] == 5.0
    assert result["share"]["expert GEMMs"] == pytest.approx(4 / 7, abs=1e-4)


@pytest.mark.slow
def test_a_traced_train_step_is_attributed_to_its_parts(tmp_path):
    config = DbrxConfig.preset("dbrx-tiny", moe_impl="dropless")
    report = timing.time_train_step(
        config,
        sharding.make_mesh({"data": 2, "expert": 4}),
        8,
        32,
        iters=1,
        profile_steps=1,
        trace_dir=str(tmp_path),
    )
    profile = report["profile"]
    ms = profile["ms_per_step"]
    for part in (
        "attention",
        "expert GEMMs",
        "routing + permutation",
        "optimizer",
        "lm_head + loss",
    ):
        assert ms[part] > 0, (part, ms)
    assert ms["expert exchange"] > 0  # the all-gather / reduce-scatter over `expert`
    assert profile["unmatched_ms_per_step"] == 0.0
    assert report["memory"]["arguments_gib"] > 0
    assert list(tmp_path.glob("**/*.xplane.pb"))  # the trace is kept for TensorBoard


@pytest.mark.slow
def test_the_train_step_can_be_compiled_ahead_of_time():
    config = DbrxConfig.preset("dbrx-tiny")
    mesh = sharding.make_mesh({"data": -1})
    tx = optax.adamw(1e-3)
    graphdef, params, opt_state, _ = state.init_train_state(config, tx, mesh)
    step = train.make_train_step(graphdef, tx)
    batch = sharding.shard_batch(data.model_batch(np.zeros((8, 17), np.int32)), mesh)
    compiled = step.lower(params, opt_state, batch, None).compile()
    _, _, metrics = compiled(params, opt_state, batch, None)
    assert np.isfinite(float(metrics["loss"]))
