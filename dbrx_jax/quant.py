"""Weight-only int8 / int4 quantization of a frozen base (QLoRA), dequantized just before use.

A weight `w` `[..., D, F]` (`x @ w` contracts its axis -2; leading axes such as E experts or L
scanned layers are kept) is stored as integer `values` of the same shape and float32 `scales`
`[..., D // group_size, F]` (`[..., 1, F]` per channel): symmetric absmax, one scale per
output channel and contraction group. The model calls `dequantize` per layer, inside its jitted
step; that is a convert and a multiply, which XLA fuses into the consumer.

Built on qwix 0.1.8's array API (`qwix.quantize` with `channelwise_axes` / `tiled_axes`,
`qwix.dequantize`, `qwix.QArray`): its numerics (absmax over `qmax + 0.5`, round to nearest,
saturate; an all-zero channel gets scale 1) are used unchanged. Its model-level PTQ and LoRA
providers are not: they patch `jax.lax.dot_general`, `jnp.einsum`, `jnp.dot` and
`lax.conv_general_dilated` inside flax module calls (not `lax.ragged_dot`, which only its QAT
provider takes; `pallas_call` is excluded), and they recognise a weight by identity with a
module parameter (`flax_util.find_param`). Our expert GEMMs get a sorted, sharded copy through
`ragged_dot`, Pallas kernels and `shard_map`, so the weight is quantized here and the dispatch
code dequantizes it explicitly (`qwix.ragged_dot` would dequantize a float-by-QArray product
first as well).

4-bit values are `jnp.int4`: storage, reshape, slicing under `lax.scan`, `shard_map` and
conversion all work under jit on CPU, and orbax saves them. `values` keeps the weight's shape,
so scanning, vmapping or sharding a `QuantizedWeight` slices it like the weight (a packed
`uint8` layout would need the logical shape in a static field, which a scan's slicing leaves
stale). XLA packs int4 two to a byte on TPU; XLA:CPU keeps one byte per value in memory.
`nbytes` counts the packed size (half a byte per value), as on TPU and in a checkpoint's
logical size.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import qwix
from flax import nnx

_QTYPES = {8: jnp.int8, 4: jnp.int4}
_FLOATS = tuple(jnp.dtype(t) for t in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


@flax.struct.dataclass
class QuantizedWeight:
    """A weight `[..., D, F]` as `values` (int8 or int4, the weight's shape) times `scales`
    (`[..., G, F]` with G = D // group_size, or 1 per channel), broadcast over each group.

    `axis` is the contraction axis, stored negative so that slicing leading axes (a scan over
    layers) leaves it right; `dtype` is the original weight's."""

    values: jax.Array
    scales: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int | None = flax.struct.field(pytree_node=False)
    dtype: jnp.dtype = flax.struct.field(pytree_node=False)
    axis: int = flax.struct.field(pytree_node=False, default=-2)

    @property
    def shape(self) -> tuple[int, ...]:
        """The original weight's shape (that of `values`, whatever leading axes were sliced)."""
        return self.values.shape

    @property
    def num_groups(self) -> int:
        return self.scales.shape[self.axis]


nnx.register_data_type(QuantizedWeight)  # a Module may hold one as an attribute


def quantize(
    w: jax.Array,
    bits: int = 8,
    group_size: int | None = None,
    *,
    axis: int = -2,
    scale_dtype=jnp.float32,
) -> QuantizedWeight:
    """Symmetric absmax quantization of `w` to `bits` (8 or 4), one scale per output channel
    and per `group_size` rows of the contraction `axis` (None: the whole axis). Every axis but
    `axis` keeps its own scales (experts, layers, outputs). `axis=0` suits `wqkv` `[D, K, J, H]`.
    """
    w = jnp.asarray(w)
    if bits not in _QTYPES:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 dims ([..., D, F]), got shape {w.shape}")
    if w.dtype not in _FLOATS:
        raise ValueError(f"w must be a float array (bf16, f16, f32, f64), got dtype {w.dtype}")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis must be in [{-w.ndim}, {w.ndim}) for shape {w.shape}, got {axis}")
    axis -= w.ndim if axis >= 0 else 0
    D = w.shape[axis]
    if group_size is not None and (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or D % group_size
    ):
        raise ValueError(
            f"group_size must be None or a positive divisor of the contraction axis "
            f"(w.shape[{axis}] = {D}), got {group_size!r}"
        )
    channels = tuple(a for a in range(w.ndim) if a != w.ndim + axis)
    tiled = {} if group_size is None else {w.ndim + axis: group_size}
    # fp32 quantization math: in bf16 (8 significant bits), w / scale near 127 is off by up to
    # a quarter step before rounding.
    q = qwix.quantize(
        w.astype(jnp.promote_types(w.dtype, jnp.float32)),
        _QTYPES[bits],
        channelwise_axes=channels,
        tiled_axes=tiled,
        scale_dtype=scale_dtype,
    )
    return QuantizedWeight(q.qvalue, q.scale, bits, group_size, w.dtype, axis)


def dequantize(q: QuantizedWeight, dtype=None) -> jax.Array:
    """`values * scales` (each scale broadcast over its group) in `dtype` (default: the original
    weight's). Integers convert exactly; the product is rounded once, to `dtype`."""
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    if dtype not in _FLOATS:
        raise ValueError(f"dtype must be a float dtype (bf16, f16, f32, f64), got {dtype}")
    qarray = qwix.QArray(q.values, q.scales, qtype=_QTYPES[q.bits])
    return qwix.dequantize(qarray).astype(dtype)


def nbytes(q: QuantizedWeight | jax.Array) -> int:
    """Storage bytes: values at `bits` each (int4 packed two to a byte) plus the scales. A plain
    array counts its own bytes, so a mixed parameter tree sums with one call per leaf."""
    if not isinstance(q, QuantizedWeight):
        return int(q.size) * jnp.dtype(q.dtype).itemsize
    values = (int(q.values.size) * q.bits + 7) // 8
    return values + int(q.scales.size) * q.scales.dtype.itemsize


def scales_axes(
    weight_axes: Sequence[str | None], num_groups: int, *, axis: int = -2
) -> tuple[str | None, ...]:
    """The logical axis names of the scales of a weight named `weight_axes`: the same names,
    but the contraction `axis` keeps its name only when it has more than one group (a sharded
    contraction axis then needs `num_groups` divisible by its mesh size)."""
    names = list(weight_axes)
    if not -len(names) <= axis < len(names):
        raise ValueError(f"axis must index weight_axes {tuple(weight_axes)}, got {axis}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if num_groups == 1:
        names[axis] = None
    return tuple(names)


# The block matrices a QLoRA base stores quantized, with the axis each contracts (from the end,
# so that a stack of layers is quantized layer by layer). Norms, the router, the embedding and
# lm_head stay as stored: small, or not matmul weights of the blocks.
BLOCK_WEIGHTS = {"wqkv": -4, "out": -2, "w1": -2, "v1": -2, "w2": -2}


def quantize_base(base: nnx.State, bits: int, group_size: int | None = None) -> nnx.State:
    """A model's frozen parameters with every BLOCK_WEIGHTS matrix replaced by its
    `QuantizedWeight` (jitted: each array stays on the devices that hold it). A group size that
    does not divide a weight's contraction axis is an error naming the weight."""
    flat = list(nnx.to_flat_state(base))
    for path, variable in flat:
        axis = BLOCK_WEIGHTS.get(str(path[-1]))
        if axis is not None and group_size and variable.shape[axis] % group_size:
            name = "/".join(str(p) for p in path)
            raise ValueError(
                f"quant_group_size={group_size}: does not divide {name}'s contraction axis "
                f"({variable.shape[axis]})"
            )

    @jax.jit
    def convert(values):
        out = []
        for (path, _), value in zip(flat, values, strict=True):
            axis = BLOCK_WEIGHTS.get(str(path[-1]))
            out.append(value if axis is None else quantize(value, bits, group_size, axis=axis))
        return out

    values = convert([variable.get_value() for _, variable in flat])
    return nnx.from_flat_state(
        [(path, v.replace(value)) for (path, v), value in zip(flat, values, strict=True)]
    )


def dense(value: QuantizedWeight | jax.Array, dtype) -> jax.Array:
    """A weight as an array in `dtype`: dequantized if it is stored quantized."""
    if isinstance(value, QuantizedWeight):
        return dequantize(value, dtype)
    return value.astype(dtype)
