"""The MoE execution plan: decided once from the config and the mesh's devices, never from the
host's platform or an ambient mesh, logged, and refusing what it cannot honour."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import Dbrx, DbrxConfig, sharding
from dbrx_jax.moe import gmm, plan_moe
from dbrx_jax.moe.plan import GATHER_MAX_ASSIGNMENTS, MoEPlan

TINY = DbrxConfig.preset("dbrx-tiny")


class _Device:
    def __init__(self, platform):
        self.platform = platform


@dataclasses.dataclass(frozen=True)
class _DevicesMesh:
    """Stands in for a mesh of another platform's devices (a TPU slice described on a CPU
    host): what the plan reads of a mesh is its axis names, sizes and devices."""

    platform: str

    axis_names = sharding.MESH_AXES

    @property
    def shape(self):
        return {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}

    @property
    def devices(self):
        return np.array([_Device(self.platform)] * 8, dtype=object).reshape(1, 2, 4, 1)


def test_one_device_plan_on_cpu():
    plan = plan_moe(TINY)
    assert isinstance(plan, MoEPlan) and plan.platform == "cpu" and plan.mesh is None
    assert (plan.dispatch, plan.gmm.backend, plan.exchange) == ("dropless", "blocked", None)
    assert plan.dispatch_for(GATHER_MAX_ASSIGNMENTS) == "gather"  # a decode step
    assert plan.dispatch_for(GATHER_MAX_ASSIGNMENTS + 1) == "dropless"
    assert plan_moe(TINY.replace(moe_impl="dropless")).dispatch_for(1) == "dropless"
    assert plan_moe(TINY) is plan  # resolved once per (config, mesh)


def test_a_one_device_mesh_runs_the_moe_as_without_a_mesh():
    """No shard_map (its collectives would run as copies): the single-device plan, decode
    steps gathering their experts included."""
    plan = plan_moe(TINY, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert plan.exchange is None and not plan.expert_parallel and plan.mesh is not None
    assert plan.dispatch_for(GATHER_MAX_ASSIGNMENTS) == "gather"


def test_the_platform_is_the_mesh_devices_not_the_hosts():
    """A mesh of TPU devices built on this CPU host gets the TPU grouped GEMM, not the CPU loop."""
    tpu = plan_moe(TINY, _DevicesMesh("tpu"))
    assert (tpu.platform, tpu.gmm.backend, tpu.exchange) == ("tpu", "megablox", "all_gather")
    assert not tpu.gmm.interpret
    assert "expert parallel under shard_map: experts split 4 ways" in tpu.describe()
    gpu = plan_moe(TINY.replace(moe_exchange="all_to_all"), _DevicesMesh("gpu"))
    assert gpu.gmm.backend == "tokamax" and gpu.exchange == "all_to_all"


def test_a_gpu_without_tokamax_is_told_at_build_and_refused_at_the_first_call():
    plan = plan_moe(TINY, _DevicesMesh("gpu"))
    assert plan.gmm.backend == "tokamax"  # never the densified ragged_dot
    if gmm.tokamax_available():
        pytest.skip("tokamax is installed here")
    assert any("needs the tokamax package" in note for note in plan.notes)
    with pytest.raises(RuntimeError, match="needs the tokamax package"):
        plan.gmm(jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.asarray([2, 2]))


def test_choices_without_effect_or_slow_are_noted(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_moe(TINY.replace(moe_impl="capacity", moe_gmm_impl="tokamax"))
        interpreted = plan_moe(TINY.replace(moe_gmm_impl="megablox"))
        densified = plan_moe(TINY.replace(moe_gmm_impl="ragged_dot"), _DevicesMesh("gpu"))
    assert plan.gmm is None and "moe_gmm_impl has no effect on capacity" in plan.notes[0]
    assert interpreted.gmm.interpret and "interpreter" in interpreted.notes[0]
    assert "densifies it on gpu" in densified.notes[0]
    assert any("moe_gmm_impl has no effect" in r.message for r in caplog.records)


def test_a_mesh_of_other_axis_names_is_refused():
    mesh = jax.make_mesh((2, 4), ("dp", "ep"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"needs the axes \('data', 'fsdp', 'expert', 'tensor'\)"):
        Dbrx(TINY, rngs=nnx.Rngs(0), mesh=mesh)


def test_the_model_runs_its_plan_and_logs_a_batch_it_cannot_split(caplog):
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    model = Dbrx(TINY, rngs=nnx.Rngs(0)).on_mesh(mesh)
    assert model.plan.expert_parallel and model.plan.mesh is mesh
    assert model.blocks.ffn.plan is model.plan  # every layer runs the model's plan
    with caplog.at_level(logging.INFO):
        jax.jit(lambda m, t: m(t).logits)(model, jnp.zeros((1, 4), jnp.int32))
    assert any(
        "a batch of 1 rows does not split over the 8 batch shards" in r.message
        for r in caplog.records
    )
