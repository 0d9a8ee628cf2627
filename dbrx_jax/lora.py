"""Low-rank adapters (LoRA) on DBRX's matrices, the routed experts included.

For a weight `W` that contracts axes C into axes O, an adapter is `A: [C..., r]` and
`B: [r, O...]`, and the layer computes `x W + (alpha / r) (x A) B`. An expert weight keeps its
leading E axis in both (`A: [E, D, r]`, `B: [E, r, F]`): the rows of expert e meet `A_e` and
`B_e` in the same grouped GEMM, over the same sorted rows, as `W_e` (moe/dispatch.py
`project`), and under expert parallelism the adapters are sharded with their experts. B starts
at zero, so a fresh adapter leaves the model exactly as it was.

Adapters are `nnx.LoRAParam`s (a kind of `nnx.Param`): `nnx.split(model, nnx.LoRAParam,
nnx.Param)` separates what trains from the frozen base. Which weights get one is
`DbrxConfig.lora_targets`, comma-separated patterns (fnmatch) over the names in
`config.LORA_TARGETS`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dbrx_jax.config import LORA_TARGETS, DbrxConfig, lora_targets
from dbrx_jax.nn import at_least_fp32

RANK_AXIS = "lora_rank"  # logical axis of the rank (never sharded)


def targets(config: DbrxConfig) -> frozenset[str]:
    """The weights `config` puts adapters on (none with `lora_rank=0`)."""
    if not config.lora_rank:
        return frozenset()
    return lora_targets(config.lora_targets)


class Adapter(nnx.Module):
    """`A` and `B` of one weight (see the module docstring), in at least fp32 whatever the base
    (the trained copy), applied in the compute dtype."""

    def __init__(
        self,
        config: DbrxConfig,
        name: str,
        shape: tuple[int, ...],
        logical_axes: tuple[str, ...],
        *,
        rngs: nnx.Rngs,
    ):
        lead, contract = LORA_TARGETS[name]
        r = config.lora_rank
        batch, inner, outer = shape[:lead], shape[lead : lead + contract], shape[lead + contract :]
        axes = (logical_axes[:lead], logical_axes[lead : lead + contract])
        axes += (logical_axes[lead + contract :],)
        dtype = at_least_fp32(config.weight_dtype)
        std = 1.0 / math.sqrt(math.prod(inner))  # x A keeps x's scale
        a = std * jax.random.normal(rngs.params(), (*batch, *inner, r), dtype)
        self.a = nnx.LoRAParam(a, logical_axes=(*axes[0], *axes[1], RANK_AXIS))
        b = jnp.zeros((*batch, r, *outer), dtype)
        self.b = nnx.LoRAParam(b, logical_axes=(*axes[0], RANK_AXIS, *axes[2]))
        self.scale = config.lora_alpha / r
        self.contract = contract
        self.dtype = config.compute_dtype

    def __call__(self, x: jax.Array, down: str, up: str) -> jax.Array:
        """`scale * (x A) B` by the einsums `down` (x, A) and `up` (x A, B)."""
        xa = jnp.einsum(down, x, self.a[...].astype(self.dtype))
        return self.scale * jnp.einsum(up, xa, self.b[...].astype(self.dtype))

    def low_rank(self, w: jax.Array) -> LowRank:
        """`w` with this adapter, for the MoE's dispatch paths."""
        return LowRank(w, self.a[...].astype(w.dtype), self.b[...].astype(w.dtype), self.scale)

    def delta(self) -> jax.Array:
        """`scale * A B` in the weight's shape (the adapter's dtype): what merging adds. Any
        axes before the weight's own (the stacked layers) are kept."""
        a, b = self.a[...], self.b[...]
        lead = a.ndim - 1 - self.contract  # batch axes: the layers', the experts'
        inner, outer = a.shape[lead:-1], b.shape[lead + 1 :]
        a_XIr = a.reshape(*a.shape[:lead], math.prod(inner), a.shape[-1])
        b_XrO = b.reshape(*b.shape[:lead], b.shape[lead], math.prod(outer))
        return self.scale * jnp.matmul(a_XIr, b_XrO).reshape(*a.shape[:lead], *inner, *outer)


@struct.dataclass
class LowRank:
    """An expert weight `w` `[E, I, O]` with its adapter `a` `[E, I, r]`, `b` `[E, r, O]`: what
    the MoE's dispatch paths take in place of `w` (moe/dispatch.py `project`)."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype


def project(matmul, x: jax.Array, w: jax.Array | LowRank) -> jax.Array:
    """`matmul(x, w)`, plus `scale * matmul(matmul(x, a), b)` for an adapted weight: the same
    (grouped, batched or gathered) matmul runs the adapter."""
    if isinstance(w, LowRank):
        return matmul(x, w.w) + w.scale * matmul(matmul(x, w.a), w.b)
    return matmul(x, w)
