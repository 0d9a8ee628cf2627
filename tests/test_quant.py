"""Weight-only int8 / int4 quantization (dbrx_jax/quant.py): error bounds, layout, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dbrx_jax.quant import QuantizedWeight, dequantize, nbytes, quantize, scales_axes

RNG = np.random.RandomState(0)
E, D, F, T = 4, 64, 24, 5
FP32_EPS = float(np.finfo(np.float32).eps)


def _w(*shape, std=0.02):
    return jnp.asarray(std * RNG.standard_normal(shape), jnp.float32)


def _scale_per_element(q: QuantizedWeight) -> np.ndarray:
    """The scale each element was quantized with: `scales` repeated over its group."""
    s = np.asarray(q.scales, np.float64)
    return np.repeat(s, q.shape[q.axis] // s.shape[q.axis], axis=q.axis)


def _half_step(q: QuantizedWeight, w) -> np.ndarray:
    """The round-trip bound: half the element's scale, plus fp32 rounding of `w / scale` (an
    element at the top of the range, |w / scale| = qmax + 0.5, may round either way) and of the
    product, a few ulps of |w|."""
    return _scale_per_element(q) / 2 + 4 * FP32_EPS * np.abs(np.asarray(w, np.float64))


def _error(q: QuantizedWeight, w) -> np.ndarray:
    return np.abs(np.asarray(dequantize(q, jnp.float32), np.float64) - np.asarray(w, np.float64))


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 16), (4, None), (4, 16), (4, 8)])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size):
    w_EDF = _w(E, D, F)
    q = quantize(w_EDF, bits, group_size)
    assert (_error(q, w_EDF) <= _half_step(q, w_EDF)).all()
    qmax = 2 ** (bits - 1) - 1
    assert np.abs(np.asarray(q.values, np.int32)).max() <= qmax + 1
    # absmax calibration over qmax + 0.5 (qwix): the largest element sits in the top bucket
    assert np.abs(np.asarray(q.values, np.int32)).max() >= qmax


@pytest.mark.parametrize("bits,values_dtype", [(8, jnp.int8), (4, jnp.int4)])
def test_shapes_and_dtypes(bits, values_dtype):
    w_EDF = _w(E, D, F).astype(jnp.bfloat16)
    per_channel = quantize(w_EDF, bits)
    grouped = quantize(w_EDF, bits, group_size=16)
    for q, groups in ((per_channel, 1), (grouped, D // 16)):
        assert q.values.dtype == values_dtype and q.values.shape == (E, D, F) == q.shape
        assert q.scales.dtype == jnp.float32 and q.scales.shape == (E, groups, F)
        assert q.num_groups == groups and q.bits == bits and q.dtype == jnp.bfloat16
        assert dequantize(q).dtype == jnp.bfloat16  # the original dtype by default
        assert dequantize(q, jnp.float32).dtype == jnp.float32
        assert dequantize(q).shape == (E, D, F)
    assert quantize(w_EDF, bits, scale_dtype=jnp.bfloat16).scales.dtype == jnp.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_grouped_scales_are_finer_than_per_channel_with_outlier_rows(bits):
    w_DF = np.array(_w(D, F))
    w_DF[:4] *= 100.0  # outlier rows: they set every column's per-channel scale
    per_channel = _error(quantize(jnp.asarray(w_DF), bits), w_DF)
    grouped = _error(quantize(jnp.asarray(w_DF), bits, group_size=16), w_DF)
    # outside the outliers' group the scales are ~100x finer; at 4 bits the per-channel error
    # saturates at |w| (every ordinary element rounds to 0), so the gain there is ~10x
    assert grouped[16:].mean() < per_channel[16:].mean() / 5
    assert grouped.max() <= per_channel.max()


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_exact_zeros_stay_zero(bits, group_size):
    w_DF = np.array(_w(D, F))
    w_DF[RNG.rand(D, F) < 0.3] = 0.0
    w_DF[:, 3] = 0.0  # an all-zero column (scale falls back to 1)
    w_DF[16:32, 5] = 0.0  # an all-zero group
    q = quantize(jnp.asarray(w_DF), bits, group_size)
    dq = np.asarray(dequantize(q))
    assert np.isfinite(dq).all() and np.isfinite(np.asarray(q.scales)).all()
    assert (dq[w_DF == 0.0] == 0.0).all()


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_jit_equals_eager(bits, group_size):
    w_EDF = _w(E, D, F)
    q = quantize(w_EDF, bits, group_size)
    q_jit = jax.jit(quantize, static_argnums=(1, 2))(w_EDF, bits, group_size)
    np.testing.assert_array_equal(np.asarray(q_jit.values), np.asarray(q.values))
    np.testing.assert_array_equal(np.asarray(q_jit.scales), np.asarray(q.scales))
    for dtype in (jnp.float32, jnp.bfloat16):
        eager = np.asarray(dequantize(q, dtype), np.float32)
        jitted = np.asarray(jax.jit(dequantize, static_argnums=1)(q, dtype), np.float32)
        np.testing.assert_array_equal(jitted, eager)


def test_nbytes_counts_int4_as_half_a_byte():
    w_EDF = _w(E, D, F)
    for group_size, groups in ((16, D // 16), (None, 1)):
        scales = E * groups * F * 4  # float32
        assert nbytes(quantize(w_EDF, 8, group_size)) == E * D * F + scales
        assert nbytes(quantize(w_EDF, 4, group_size)) == E * D * F // 2 + scales
    # per channel the scales are 1 / D of the values: int4 is about half of int8
    assert 0.5 <= nbytes(quantize(w_EDF, 4)) / nbytes(quantize(w_EDF, 8)) < 0.53
    assert nbytes(w_EDF) == E * D * F * 4  # a plain array counts its own bytes
    assert nbytes(quantize(_w(3, 5), 4)) == 8 + 5 * 4  # 15 values: 7.5 bytes, rounded up


def test_an_expert_stack_is_quantized_per_expert():
    w_EDF = _w(E, D, F) * (10.0 ** jnp.arange(E))[:, None, None]
    q = quantize(w_EDF, 4, group_size=16)
    s = np.asarray(q.scales)
    np.testing.assert_allclose(s[1:].mean((1, 2)) / s[:-1].mean((1, 2)), 10.0, rtol=0.3)
    for e in range(E):  # the stack equals each expert on its own
        q_e = quantize(w_EDF[e], 4, group_size=16)
        np.testing.assert_array_equal(np.asarray(q.values[e]), np.asarray(q_e.values))
        np.testing.assert_array_equal(s[e], np.asarray(q_e.scales))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_matmul_error_is_bounded_by_the_scales(bits, group_size):
    w_EDF = _w(E, D, F)
    x_ETD = jnp.asarray(RNG.standard_normal((E, T, D)), jnp.float32)
    q = quantize(w_EDF, bits, group_size)
    y = jnp.einsum("etd,edf->etf", x_ETD, dequantize(q), precision="highest")
    y_ref = jnp.einsum("etd,edf->etf", x_ETD, w_EDF, precision="highest")
    # |x (W' - W)| <= |x| (scale / 2), element by element; plus fp32 accumulation slack
    bound = np.einsum("etd,edf->etf", np.abs(np.asarray(x_ETD, np.float64)), _scale_per_element(q))
    bound = bound / 2 + 1e-5 * np.abs(np.asarray(y_ref)) + 1e-6
    assert (np.abs(np.asarray(y) - np.asarray(y_ref)) <= bound).all()
    err = np.abs(np.asarray(y) - np.asarray(y_ref)).max()
    assert err > 0  # the bound is not vacuous: quantization did change the product


def test_leading_axes_slice_like_the_weight_under_scan():
    """A layer-stacked `[L, E, D, F]` weight scanned over L: each step dequantizes its layer."""
    w_LEDF = _w(3, E, D, F)
    q = quantize(w_LEDF, 4, group_size=16)

    def body(carry, q_layer: QuantizedWeight):
        assert q_layer.shape == (E, D, F) and q_layer.num_groups == D // 16
        return carry, dequantize(q_layer)

    _, per_layer = jax.jit(lambda q: jax.lax.scan(body, 0.0, q))(q)
    np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(dequantize(q)))


def test_a_contraction_axis_other_than_minus_two():
    """`wqkv` `[D, K, J, H]` contracts its axis 0."""
    w_DKJH = _w(D, 2, 3, 8)
    q = quantize(w_DKJH, 8, group_size=16, axis=0)
    assert q.axis == -4 and q.scales.shape == (D // 16, 2, 3, 8)
    assert (_error(q, w_DKJH) <= _half_step(q, w_DKJH)).all()


def test_sharded_over_experts():
    """Values sharded like the weight, scales by `scales_axes`: dequantize stays sharded."""
    mesh = jax.make_mesh((8,), ("expert",))
    w_EDF = _w(8, D, F)
    q = quantize(w_EDF, 4, group_size=16)
    rules = {"expert": "expert"}  # a one-entry logical -> mesh table
    spec = lambda axes: NamedSharding(mesh, P(*(rules.get(a) for a in axes)))  # noqa: E731
    weight_axes = ("expert", "embed", "mlp")
    q_sharded = QuantizedWeight(
        jax.device_put(q.values, spec(weight_axes)),
        jax.device_put(q.scales, spec(scales_axes(weight_axes, q.num_groups))),
        q.bits,
        q.group_size,
        q.dtype,
        q.axis,
    )
    out = jax.jit(dequantize)(q_sharded)
    assert out.sharding.spec[0] == "expert"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(q)))


def test_scales_axes():
    axes = ("expert", "embed", "mlp")
    assert scales_axes(axes, 4) == axes
    assert scales_axes(axes, 1) == ("expert", None, "mlp")
    wqkv = ("embed", "kv_heads", "qkv", "head_dim")
    assert scales_axes(wqkv, 1, axis=0) == (None, "kv_heads", "qkv", "head_dim")
    with pytest.raises(ValueError, match=r"^num_groups must be >= 1, got 0$"):
        scales_axes(axes, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 3}, r"^bits must be 4 or 8, got 3$"),
        ({"bits": 16}, r"^bits must be 4 or 8, got 16$"),
        ({"group_size": 0}, r"^group_size must be None or a positive divisor .* got 0$"),
        ({"group_size": -16}, r"^group_size must be .*\(w.shape\[-2\] = 64\), got -16$"),
        ({"group_size": 48}, r"^group_size must be .*\(w.shape\[-2\] = 64\), got 48$"),
        ({"group_size": 16.0}, r"^group_size must be .* got 16.0$"),
        ({"w": jnp.ones((D, F), jnp.int32)}, r"^w must be a float array .* got dtype int32$"),
        ({"w": jnp.ones((D,))}, r"^w must have at least 2 dims .* got shape \(64,\)$"),
        ({"axis": 2}, r"^axis must be in \[-2, 2\) for shape \(64, 24\), got 2$"),
    ],
)
def test_errors(kwargs, match):
    kwargs = {"w": _w(D, F), **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        quantize(**kwargs)
    assert "\n" not in str(info.value)


def test_dequantize_rejects_a_non_float_dtype():
    with pytest.raises(ValueError, match=r"^dtype must be a float dtype .* got int8$"):
        dequantize(quantize(_w(D, F)), jnp.int8)
