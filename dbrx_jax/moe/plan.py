"""The MoE execution plan: which dispatch, grouped-GEMM backend, expert exchange and fusion the
MoE layers of a model run, decided once when the model is built for its mesh and devices.

`plan_moe(config, mesh)` resolves the `moe_*` knobs of a `DbrxConfig` against the devices the
program is for (the mesh's, or the default device's without a mesh), not the host's: a mesh of
TPU devices built on a CPU host gets the TPU plan. It is resolved once per (config, mesh), its
notes (a knob without effect, a slow choice) are logged as warnings then, the model keeps it
(`model.plan`) and the training loop prints `MoEPlan.describe()`. What the plan leaves to the
call is written in it: a call with at most `gather_max_assignments` (token, slot) assignments,
a decode step, gathers its experts' weights instead of sorting. Nothing else is re-decided per
call; the one choice a batch's shape forces under a mesh (too few rows to split over the batch
shards) is logged when the step is compiled (moe/exchange.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
from jax.sharding import Mesh

from dbrx_jax import sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.moe.dispatch import PRODUCTS_MAX
from dbrx_jax.moe.gmm import (
    TOKAMAX_MISSING,
    GroupedMatmul,
    for_platform,
    tokamax_available,
    tpu_generation,
)

log = logging.getLogger(__name__)

# `moe_impl="auto"`: a call with at most this many (token, slot) assignments multiplies each by
# its expert's weights in place instead of sorting (a decode step: sorting a few rows costs
# more than it saves); the gather path's limit for one product per assignment.
GATHER_MAX_ASSIGNMENTS = PRODUCTS_MAX


@dataclasses.dataclass(frozen=True)
class MoEPlan:
    """How the MoE layers of one model run (hashable: it is part of the model's static graph).

    dispatch: dense | dropless | capacity | gather (moe/dispatch.py).
    gather_max_assignments: calls with at most this many assignments use `gather` (0: never).
    gmm: the grouped GEMM of the dropless path (None when the plan never sorts).
    capacity_factor: the capacity path's slots per expert, as a multiple of the even share.
    fuse_gate_up: one [E, D, 2F] GEMM for the GLU's gate and up projections.
    mesh: the mesh the model runs on (None: one device).
    exchange: with a mesh, the dropless MoE runs under `shard_map` with experts split over the
      `expert` axis and tokens travelling to them this way (all_gather | all_to_all); None when
      GSPMD partitions the MoE (dense, capacity) or there is no mesh.
    platform: the devices' platform the plan was made for.
    notes: decisions worth a line in the log (a knob without effect, a slow fallback chosen).
    """

    dispatch: str
    gather_max_assignments: int
    gmm: GroupedMatmul | None
    capacity_factor: float
    fuse_gate_up: bool
    mesh: Mesh | None
    exchange: str | None
    platform: str
    notes: tuple[str, ...] = ()

    @property
    def expert_parallel(self) -> bool:
        return self.exchange is not None

    def dispatch_for(self, num_assignments: int) -> str:
        """The dispatch of a call with this many (token, slot) assignments (a static shape)."""
        return "gather" if num_assignments <= self.gather_max_assignments else self.dispatch

    def describe(self) -> str:
        parts = [f"{self.dispatch} dispatch"]
        if self.gmm is not None:
            mode = ", interpreted" if self.gmm.interpret else ""
            mode += f" for {self.gmm.tpu}" if self.gmm.tpu else ""
            parts[0] += f" (grouped GEMM: {self.gmm.backend}{mode})"
        if self.gather_max_assignments:
            parts.append(f"gather when a call has <= {self.gather_max_assignments} assignments")
        if self.dispatch == "capacity":
            parts.append(f"capacity factor {self.capacity_factor:g}")
        if self.mesh is None:
            parts.append("one device")
        elif self.expert_parallel:
            sizes = dict(self.mesh.shape)
            batch = " x ".join(f"{a} {sizes[a]}" for a in sharding.BATCH_AXES)
            split = (
                f"experts split {sizes['expert']} ways over 'expert'"
                if sizes["expert"] > 1
                else "every device holds all experts ('expert' has size 1)"
            )
            if sizes["tensor"] > 1:
                split += f", their hidden dim {sizes['tensor']} ways over 'tensor'"
            parts.append(
                f"expert parallel under shard_map: {split}; tokens in batch shards "
                f"({batch}); {self.exchange} exchange"
            )
        else:
            parts.append(f"partitioned by GSPMD over mesh {dict(self.mesh.shape)}")
        parts.append("gate/up fused" if self.fuse_gate_up else "gate/up as two GEMMs")
        text = f"MoE plan ({self.platform}): " + "; ".join(parts)
        return text + "".join(f"\n  note: {note}" for note in self.notes)


def _device_of(mesh: Mesh | None):
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def platform_of(mesh: Mesh | None) -> str:
    """The platform a program for `mesh` runs on: its devices', else the default device's."""
    return _device_of(mesh).platform


def tpu_of(mesh: Mesh | None) -> str | None:
    """The TPU generation ("v5p", "v6e", ...) a program for `mesh` runs on, from its devices'
    kind (a TPU slice described on a CPU host has them too); None off TPU."""
    device = _device_of(mesh)
    if device.platform != "tpu":
        return None
    return tpu_generation(getattr(device, "device_kind", "TPU"))


@functools.lru_cache(maxsize=64)
def plan_moe(config: DbrxConfig, mesh: Mesh | None = None) -> MoEPlan:
    """The plan for `config`'s MoE knobs on `mesh`'s devices (see the module docstring),
    resolved once per (config, mesh)."""
    if mesh is not None:
        sharding.check_mesh(mesh)
    platform = platform_of(mesh)
    notes = []
    dispatch = "dropless" if config.moe_impl == "auto" else config.moe_impl
    gather_max = GATHER_MAX_ASSIGNMENTS if config.moe_impl == "auto" else 0
    exchange = None
    # One device: nothing to exchange. Under shard_map its collectives would still run, as
    # copies (about 2% of the dbrx-small CPU training step), so it runs as without a mesh.
    split = mesh is not None and mesh.devices.size > 1
    if split and dispatch in ("dropless", "gather"):
        if dispatch == "gather":
            notes.append("moe_impl='gather' has no expert-parallel form: dropless under shard_map")
        dispatch, gather_max, exchange = "dropless", 0, config.moe_exchange
    elif split and config.moe_exchange != "all_gather":
        notes.append(f"moe_exchange has no effect: {dispatch} dispatch is partitioned by GSPMD")
    gmm = None
    if dispatch == "dropless":
        gmm = for_platform(config.moe_gmm_impl, platform, tpu_of(mesh))
        if config.moe_gmm_impl == "ragged_dot" and platform in ("gpu", "cpu"):
            notes.append(f"moe_gmm_impl='ragged_dot': XLA densifies it on {platform} (slow)")
        if gmm.backend == "tokamax" and not tokamax_available():
            notes.append(f"the first MoE call will fail: {TOKAMAX_MISSING}")
        if gmm.interpret:
            notes.append(f"megablox runs in Pallas' interpreter on {platform} (slow: for tests)")
    elif config.moe_gmm_impl != "auto":
        notes.append(f"moe_gmm_impl has no effect on {dispatch} dispatch")
    fuse = config.moe_fuse_gate_up and dispatch in ("dropless", "capacity")
    if config.moe_fuse_gate_up and not fuse:
        notes.append(f"moe_fuse_gate_up has no effect on {dispatch} dispatch")
    plan = MoEPlan(
        dispatch=dispatch,
        gather_max_assignments=gather_max,
        gmm=gmm,
        capacity_factor=config.moe_capacity_factor,
        fuse_gate_up=fuse,
        mesh=mesh,
        exchange=exchange,
        platform=platform,
        notes=tuple(notes),
    )
    log.debug("%s", plan.describe().split("\n")[0])  # train.py logs it in the run's log
    for note in notes:
        log.warning("MoE plan: %s", note)
    return plan
