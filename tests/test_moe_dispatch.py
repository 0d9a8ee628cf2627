"""Every dispatch path and grouped-GEMM backend against the dense reference, values and
gradients; the capacity path's drops; the dropless backward being gathers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import synthetic
from dbrx_jax.moe import blocked, gmm
from dbrx_jax.moe.dispatch import (
    PRODUCTS_MAX,
    capacity_per_expert,
    collect_rows,
    dispatch_rows,
    experts,
    fuse_gate_up,
    queue_positions,
    sorted_layout,
)

D, F, E = 16, 24, 16
IMPLS = ["dropless:ragged_dot", "dropless:blocked", "capacity"]


def _problem(T, k, routing, seed=0):
    rng = np.random.RandomState(seed)
    ids, weights = synthetic.routing(routing, T, E, k, seed=seed)
    arrays = (
        rng.randn(T, D),
        weights,
        rng.randn(E, D, F) / 4,
        rng.randn(E, D, F) / 4,
        rng.randn(E, F, D) / 5,
    )
    return jnp.asarray(ids), tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _grouped_matmul(backend: str) -> gmm.GroupedMatmul:
    """A backend as the plan would run it here (megablox off TPU: interpreted)."""
    return gmm.for_platform(backend, jax.default_backend())


def _value_and_grads(name, ids, args, cotangent, capacity_factor=None, fused=False):
    impl, _, backend = name.partition(":")
    top_k = ids.shape[1]

    def f(ids, x, weights, w1, v1, w2):
        return experts(
            x,
            ids,
            weights,
            fuse_gate_up(w1, v1) if fused else w1,
            None if fused else v1,
            w2,
            act=jax.nn.silu,
            impl=impl,
            gmm=_grouped_matmul(backend or "blocked"),
            capacity_factor=capacity_factor or E / top_k,
        )  # E/k: nothing dropped

    @jax.jit  # as the model runs it: compiled, the routing traced
    def run(ids, args, cotangent):
        (y, dropped), vjp = jax.vjp(functools.partial(f, ids), *args)
        return y, dropped, vjp((cotangent, np.zeros(dropped.shape, jax.dtypes.float0)))

    return run(ids, args, cotangent)


@pytest.mark.parametrize("routing", ["balanced", "skewed"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("name", IMPLS)
def test_equals_dense_values_and_gradients(name, k, routing):
    T = 96
    ids, args = _problem(T, k, routing)
    cotangent = jnp.asarray(np.random.RandomState(9).randn(T, D), jnp.float32)
    y_ref, _, grads_ref = _value_and_grads("dense", ids, args, cotangent)
    y, dropped, grads = _value_and_grads(name, ids, args, cotangent)
    assert not dropped.any()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for which, g, g_ref in zip(["x", "weights", "w1", "v1", "w2"], grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=which)


@pytest.mark.parametrize("T", [4, 8], ids=["one product each", "gathered matrices"])
def test_gather_equals_dense_values_and_gradients(T):
    """The decode path: up to PRODUCTS_MAX assignments one product each, more by gathering."""
    ids, args = _problem(T, 4, "skewed")
    assert (ids.size <= PRODUCTS_MAX) == (T == 4)
    cotangent = jnp.asarray(np.random.RandomState(9).randn(T, D), jnp.float32)
    y_ref, _, grads_ref = _value_and_grads("dense", ids, args, cotangent)
    y, _, grads = _value_and_grads("gather", ids, args, cotangent)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for which, g, g_ref in zip(["x", "weights", "w1", "v1", "w2"], grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=which)


@pytest.mark.parametrize("name", [*IMPLS, "dense", "gather"])
def test_fused_gate_up_equals_the_dense_reference(name):
    """One [E, D, 2F] GEMM for gate and up: same values, and the gradient splits back into
    w1's and v1's."""
    T = 64 if name != "gather" else 4
    ids, args = _problem(T, 4, "skewed")
    cotangent = jnp.asarray(np.random.RandomState(9).randn(T, D), jnp.float32)
    y_ref, _, grads_ref = _value_and_grads("dense", ids, args, cotangent)
    y, _, grads = _value_and_grads(name, ids, args, cotangent, fused=True)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for which, g, g_ref in zip(["x", "weights", "w1", "v1", "w2"], grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=which)


@pytest.mark.skipif(
    jax.default_backend() != "gpu" or not gmm.tokamax_available(),
    reason="tokamax's grouped GEMM needs a GPU and the tokamax package",
)
@pytest.mark.parametrize("routing", ["balanced", "skewed"])
def test_tokamax_backend_equals_dense(routing):
    """The GPU path of `moe_gmm_impl="auto"`, values and gradients."""
    ids, args = _problem(128, 4, routing)
    cotangent = jnp.asarray(np.random.RandomState(9).randn(128, D), jnp.float32)
    y_ref, _, grads_ref = _value_and_grads("dense", ids, args, cotangent)
    y, _, grads = _value_and_grads("dropless:tokamax", ids, args, cotangent)
    np.testing.assert_allclose(y, y_ref, rtol=2e-3, atol=2e-3)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_megablox_backend_in_interpret_mode():
    """JAX's TPU kernel, run by Pallas' interpreter on CPU: one case (it is slow there)."""
    ids, args = _problem(40, 4, "skewed")
    cotangent = jnp.asarray(np.random.RandomState(9).randn(40, D), jnp.float32)
    y_ref, _, grads_ref = _value_and_grads("dense", ids, args, cotangent)
    y, _, grads = _value_and_grads("dropless:megablox", ids, args, cotangent)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def _reference_forward(lhs, rhs, group_sizes, transpose_rhs=False):
    return jax.lax.ragged_dot(lhs, rhs.transpose(0, 2, 1) if transpose_rhs else rhs, group_sizes)


def _reference_transposed(lhs, rhs, group_sizes):
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, numbers)


def _kernel_problem(R, K, N, sizes, dtype):
    rng = np.random.RandomState(3)
    lhs = jnp.asarray(rng.randn(R, K), dtype)
    rhs = jnp.asarray(rng.randn(len(sizes), K, N) / np.sqrt(K), dtype)
    cotangent = jnp.asarray(rng.randn(R, N), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), cotangent


def _dense_gmm(lhs, rhs, sizes):
    """out[r] = lhs[r] @ rhs[group of r], zero past the groups: one einsum per group."""
    expert_R = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(lhs.shape[0]), side="right")
    inside_R = expert_R < len(sizes)
    rhs_RKN = rhs[jnp.minimum(expert_R, len(sizes) - 1)]
    out = jnp.einsum("RK,RKN->RN", lhs, rhs_RKN, preferred_element_type=jnp.float32)
    return jnp.where(inside_R[:, None], out, 0).astype(lhs.dtype)


def test_kernel_gmm_vjp_with_reference_kernels():
    """The custom VJP around a kernel pair (what moe_gmm_impl="mgpu" runs on Hopper), with
    reference kernels in the kernels' place: values and both gradients, rows past the groups
    zero (the expert-parallel path leaves such rows)."""
    lhs, rhs, sizes, cotangent = _kernel_problem(40, 16, 24, [9, 0, 14, 10], jnp.float32)
    kernels = gmm.GmmKernels(_reference_forward, _reference_transposed)
    got, vjp = jax.vjp(lambda a, b: gmm.kernel_gmm(a, b, sizes, kernels), lhs, rhs)
    want, vjp_ref = jax.vjp(lambda a, b: _dense_gmm(a, b, sizes), lhs, rhs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[33:]).any()
    for g, g_ref in zip(vjp(cotangent), vjp_ref(cotangent), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "spare"), [(jnp.float32, 48), (jnp.bfloat16, 48), (jnp.float32, 0)]
)
def test_blocked_head_and_tail_equal_the_reference(dtype, spare):
    """The CPU grouped GEMM against `_dense_gmm`, values and both gradients, with groups that
    are empty, shorter than the head (C = 32), exactly the head, and longer by tails of small
    chunks (the last one reaching past the group, or with no `spare` rows, starting early
    over rows done before) and of big ones; rows past the groups are zero both ways."""
    align, head = 16, 32
    small, big = blocked.SMALL_CHUNK, blocked.BIG_CHUNK
    sizes = [48, 0, 16, 32, 32 + 2 * small + 16, 32 + 2 * big + 16, 0, 32 + small + 16]
    rows = sum(sizes) + spare
    lhs, rhs, group_sizes, cotangent = _kernel_problem(rows, 24, 40, sizes, dtype)
    lhs = jnp.where(jnp.arange(rows)[:, None] < sum(sizes), lhs, 0)  # padding rows are zeros

    @jax.jit
    def run_and_grads(a, b, cotangent):
        got, vjp = jax.vjp(
            lambda a, b: blocked.grouped_matmul(a, b, group_sizes, align=align, head=head), a, b
        )
        return got, *vjp(cotangent)

    got, *grads = run_and_grads(lhs, rhs, cotangent)
    # The reference in fp32 on the same values (bf16 autodiff would sum 1000 rows in bf16).
    f32 = [x.astype(jnp.float32) for x in (lhs, rhs, cotangent)]
    want, vjp_ref = jax.vjp(lambda a, b: _dense_gmm(a, b, group_sizes), *f32[:2])
    cotangent_ref = f32[2]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for x, y in zip((got, *grads), (want, *vjp_ref(cotangent_ref)), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.abs(y).max())
    assert got.dtype == dtype and not np.asarray(got[sum(sizes) :], np.float32).any()
    with pytest.raises(ValueError, match="blocked grouped GEMM: 40 rows are not a multiple"):
        blocked.grouped_matmul(lhs[:40], rhs, group_sizes, align=align, head=head)


def test_blocked_head_is_the_expected_share():
    """The head covers an expert's expected rows plus half a block of padding, and the
    alignment shrinks for a handful of rows (decoding)."""
    assert blocked.head_rows(4096, 16, 16) == 272  # 256 + 8, rounded up to 16
    assert blocked.head_rows(4, 16, 8) == 8
    assert blocked.row_alignment(4096, 16) == blocked.ALIGN_ROWS
    assert blocked.row_alignment(4, 16) == 8


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU kernels need Hopper")
def test_mgpu_kernels_equal_the_references():
    """moe_gmm_impl="mgpu" on the GPU: JAX's Hopper kernels against the reference kernels, bf16."""
    lhs, rhs, sizes, cotangent = _kernel_problem(1000, 128, 384, [300, 0, 457, 200], jnp.bfloat16)
    reference = gmm.GmmKernels(_reference_forward, _reference_transposed)
    got, vjp = jax.vjp(lambda a, b: gmm.kernel_gmm(a, b, sizes, gmm.MGPU_KERNELS), lhs, rhs)
    want, vjp_ref = jax.vjp(lambda a, b: gmm.kernel_gmm(a, b, sizes, reference), lhs, rhs)
    for x, y in zip((got, *vjp(cotangent)), (want, *vjp_ref(cotangent)), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.abs(x - y).max() <= 0.02 * np.abs(y).max()


def test_capacity_drops_exactly_the_overflow():
    # 4 tokens, top-2 over 2 experts, capacity factor 0.5: C = ceil(0.5 * 4 * 2 / 2) = 2.
    ids = jnp.asarray([[0, 1], [0, 1], [0, 1], [1, 0]], jnp.int32)
    assert capacity_per_expert(4, 2, 2, 0.5) == 2
    # Queue order: all first choices by token (t0 t1 t2 -> e0, t3 -> e1), then second choices
    # (t0 t1 t2 -> e1, t3 -> e0).
    np.testing.assert_array_equal(
        queue_positions(ids, 2, slot_major=True), [[0, 1], [1, 2], [2, 3], [0, 3]]
    )
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, D), jnp.float32)
    weights = jnp.asarray(rng.rand(4, 2), jnp.float32)
    w = [jnp.asarray(rng.randn(2, D, F), jnp.float32) / 4 for _ in range(2)]
    w2 = jnp.asarray(rng.randn(2, F, D), jnp.float32) / 4
    y, dropped = experts(
        x, ids, weights, *w, w2, act=jax.nn.silu, impl="capacity", capacity_factor=0.5
    )
    expected_dropped = [[False, False], [False, True], [True, True], [False, True]]
    np.testing.assert_array_equal(dropped, expected_dropped)
    # The kept assignments give what the dense reference gives with the dropped weights zeroed.
    kept_weights = jnp.where(jnp.asarray(expected_dropped), 0.0, weights)
    y_ref, _ = experts(x, ids, kept_weights, *w, w2, act=jax.nn.silu, impl="dense")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[2], 0.0)  # both of token 2's assignments dropped


def test_sorted_layout_is_aligned_and_invertible():
    ids, _ = synthetic.routing("skewed", 50, E, 4)
    layout = sorted_layout(jnp.asarray(ids), E, alignment=8)
    rows = np.asarray(layout.row_of_assignment_MA).ravel()
    assert len(set(rows)) == rows.size  # a permutation into the padded rows
    np.testing.assert_array_equal(np.asarray(layout.assignment_of_row_P)[rows], np.arange(200))
    sizes = np.asarray(layout.group_sizes_U)
    assert np.all(sizes % 8 == 0) and np.all(sizes >= np.bincount(ids.ravel(), minlength=E))
    starts = np.cumsum(sizes) - sizes
    np.testing.assert_array_equal(  # every row lies inside its expert's group
        np.searchsorted(np.cumsum(sizes), rows, side="right"), ids.ravel()
    )
    assert np.all(rows >= starts[ids.ravel()])


def test_sorted_layout_leaves_out_foreign_experts():
    ids = jnp.asarray([[0, 3], [2, 1], [3, -1]], jnp.int32)  # experts 0 and 1 are "ours"
    layout = sorted_layout(ids, 2, alignment=1, max_rows=6)
    rows = np.asarray(layout.row_of_assignment_MA)
    P = layout.assignment_of_row_P.shape[0]
    np.testing.assert_array_equal(rows, [[0, P], [P, 1], [P, P]])
    np.testing.assert_array_equal(layout.group_sizes_U, [1, 1])
    x = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
    back = collect_rows(dispatch_rows(x, layout) * 10, layout)
    np.testing.assert_array_equal(back[:, :, 0], [[0, 0], [0, 20], [0, 0]])


def _float_scatter_adds(jaxpr) -> list[str]:
    """Float scatter-adds anywhere in a jaxpr, inside loops, conds and custom rules too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add" and jnp.issubdtype(
            eqn.outvars[0].aval.dtype, jnp.floating
        ):
            found.append(str(eqn.outvars[0].aval))
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    found += _float_scatter_adds(inner)
    return found


@pytest.mark.parametrize("gmm_impl", ["ragged_dot", "blocked"])
def test_dropless_backward_moves_rows_by_gathers(gmm_impl):
    ids, args = _problem(64, 4, "skewed")

    def loss(x, weights, w1, v1, w2):
        y, _ = experts(x, ids, weights, w1, v1, w2, act=jax.nn.silu, impl="dropless", gmm=gmm_impl)
        return jnp.vdot(y, jnp.ones_like(y))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
    assert _float_scatter_adds(jaxpr.jaxpr) == []

    # ... whereas autodiff of a plain gather scatter-adds, even inside a loop.
    def plain(x):
        return jax.lax.fori_loop(0, 2, lambda i, acc: acc + jnp.sum(x[ids.ravel() % 64]), 0.0)

    assert _float_scatter_adds(jax.make_jaxpr(jax.grad(plain))(args[0]).jaxpr)


def test_gmm_auto_never_picks_ragged_dot_on_gpu():
    """`moe_gmm_impl="auto"` per platform (moe/plan.py resolves it for the mesh's devices;
    tests/test_moe_plan.py checks that); a name that is no backend is refused."""
    assert gmm.default_backend("cpu") == "blocked"
    assert gmm.default_backend("tpu") == "megablox"  # XLA:TPU densifies ragged_dot's d rhs
    assert gmm.default_backend("gpu") == "tokamax"
    with pytest.raises(ValueError, match="grouped-GEMM backend 'cublas'"):
        gmm.GroupedMatmul("cublas")
    with pytest.raises(ValueError, match="grouped-GEMM backend 'auto'.*resolved by moe/plan.py"):
        gmm.GroupedMatmul("auto")
    ids, args = _problem(8, 2, "skewed")
    with pytest.raises(ValueError, match="dropless dispatch needs a grouped GEMM"):
        experts(args[0], ids, *args[1:], act=jax.nn.silu, impl="dropless")
