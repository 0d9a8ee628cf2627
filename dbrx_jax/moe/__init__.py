"""DBRX's mixture-of-experts FFN.

routing.py   the router (softmax, top-k, renormalisation), the losses and statistics
plan.py      which dispatch, grouped GEMM and exchange run, decided once per model and mesh
layer.py     the MoE module: router and expert parameters, running its plan
dispatch.py  dense (the reference), gather, dropless (sorted grouped GEMM) and capacity
gmm.py       grouped-GEMM backends: ragged_dot, tokamax, mgpu, megablox, a CPU block loop
exchange.py  expert parallelism under shard_map: all-gather or all-to-all
"""

from dbrx_jax.moe.layer import MoE, MoEOutput
from dbrx_jax.moe.plan import MoEPlan, plan_moe
from dbrx_jax.moe.routing import (
    MoEStats,
    RouterOutput,
    Routing,
    load_balancing_loss,
    moe_aux_loss,
    moe_stats,
    route,
    router_z_loss,
)

__all__ = [
    "MoE",
    "MoEOutput",
    "MoEPlan",
    "MoEStats",
    "RouterOutput",
    "Routing",
    "load_balancing_loss",
    "moe_aux_loss",
    "moe_stats",
    "plan_moe",
    "route",
    "router_z_loss",
]
