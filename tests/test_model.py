"""Whole-model properties: parameter count at full scale, causality, packing, remat, scan, and
the one forward path with and without a KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dbrx_jax import Dbrx, DbrxConfig, KVCache, load_balancing_loss
from dbrx_jax.model.dbrx import CPU_UNROLL_LAYERS, layer_unroll_for

TINY = DbrxConfig.preset("dbrx-tiny")


def _model(config=TINY, seed=0):
    return Dbrx(config, rngs=nnx.Rngs(seed))


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def test_full_size_model_shapes_without_memory():
    config = DbrxConfig.preset("dbrx-132b")
    abstract = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 131_596_523_520
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    params = dict(
        (path, var) for path, var in nnx.iter_graph(abstract) if isinstance(var, nnx.Param)
    )
    assert params["blocks", "ffn", "w1"].shape == (40, 16, 6144, 10752)
    assert params["blocks", "ffn", "w2"].shape == (40, 16, 10752, 6144)
    assert params["blocks", "attn", "wqkv"].shape == (40, 6144, 8, 8, 128)
    for path, var in params.items():  # every parameter is annotated for sharding
        axes = var.get_metadata("logical_axes")
        assert len(axes) == len(var.shape), path
        assert (axes[0] == "layers") == (path[0] == "blocks"), path


def test_forward_output_shapes_and_dtypes():
    out = _model()(_tokens((2, 9)))
    L, E, k = TINY.n_layers, TINY.moe_num_experts, TINY.moe_top_k
    assert out.logits.shape == (2, 9, TINY.vocab_size)
    assert out.router.logits_LBTE.shape == (L, 2, 9, E)
    assert out.router.expert_ids_LBTA.shape == out.router.weights_LBTA.shape == (L, 2, 9, k)
    assert out.router.expert_ids_LBTA.dtype == jnp.int32
    assert out.cache is None
    loss = load_balancing_loss(out.router, E)
    assert np.isfinite(float(loss)) and float(loss) > 0


def test_causality_by_gradient():
    """d(logits at t)/d(input at s) is exactly zero for every s > t and not for s <= t."""
    model = _model()
    tokens = _tokens((2, 10))
    embeds = jnp.take(model.wte[...], tokens, axis=0)
    cotangent = jax.random.normal(jax.random.key(0), (2, TINY.vocab_size))

    @jax.jit
    def grad_per_position(embeds, t):
        def logit_t(embeds):
            logits = model(inputs_embeds_BTD=embeds).logits
            return jnp.sum(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False) * cotangent)

        return jnp.abs(jax.grad(logit_t)(embeds)).sum(-1)

    for t in (0, 4, 9):
        grads = np.asarray(grad_per_position(embeds, t))
        assert np.all(grads[:, t + 1 :] == 0)
        assert np.all(grads[:, : t + 1] > 0)


@pytest.mark.slow
def test_packed_rows_equal_separate_sequences():
    model = _model()
    a, b = _tokens((1, 6), seed=1), _tokens((1, 9), seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 6 + [2] * 9])
    out = model(packed, segment_ids_BT=segments)
    np.testing.assert_allclose(out.logits[:, :6], model(a).logits, atol=2e-5)
    np.testing.assert_allclose(out.logits[:, 6:], model(b).logits, atol=2e-5)
    np.testing.assert_array_equal(
        out.router.expert_ids_LBTA[:, :, 6:], model(b).router.expert_ids_LBTA
    )


@pytest.mark.slow
def test_splash_attention_model_equals_xla():
    """The model with `attention_impl="splash"` (segment ids to the kernel, no mask; here in
    Pallas' interpreter) gives the logits of the XLA path on packed rows with left padding."""
    tokens = _tokens((2, 40))
    segments = jnp.asarray([[1] * 15 + [2] * 25, [0] * 6 + [1] * 34])
    xla = _model(TINY.replace(attention_impl="xla"))
    splash = _model(TINY.replace(attention_impl="splash"))
    assert splash.attention_impl == "splash" and splash.blocks.attn.interpret
    want = xla(tokens, segment_ids_BT=segments).logits
    got = splash(tokens, segment_ids_BT=segments).logits
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_left_padding_with_segment_zero():
    model = _model()
    seq = _tokens((1, 7), seed=3)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    segments = jnp.asarray([[0] * 3 + [1] * 7])  # positions restart at 0 for the real tokens
    out = model(padded, segment_ids_BT=segments)
    np.testing.assert_allclose(out.logits[:, 3:], model(seq).logits, atol=2e-5)


def _logits_and_grads(config, tokens):
    model = _model(config)

    def loss_fn(model):
        out = model(tokens)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]), out.logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return logits, nnx.state(grads)


def _assert_same_program_results(config, changed, tokens):
    """In float64, so that XLA fusing the changed program differently (which moves float32
    results by an ulp) cannot hide a real difference."""
    logits, grads = _logits_and_grads(config, tokens)
    logits_r, grads_r = _logits_and_grads(changed, tokens)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-13, atol=1e-13)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "matmuls"])
def test_remat_gives_identical_logits_and_gradients(policy, x64):
    config = TINY.replace(dtype="float64", param_dtype="float64")
    _assert_same_program_results(config, config.replace(remat_policy=policy), _tokens((2, 8)))


def test_layers_are_unrolled_for_a_small_models_training_step_on_cpu():
    """`scan_unroll` auto: every block of a small model in a training step on CPU, the scan
    elsewhere; a value given is kept."""
    assert layer_unroll_for(TINY, "cpu", training=True) == TINY.n_layers
    assert layer_unroll_for(TINY, "cpu", training=False) == 1
    assert layer_unroll_for(TINY, "gpu", training=True) == 1
    deep = TINY.replace(n_layers=CPU_UNROLL_LAYERS + 1)
    assert layer_unroll_for(deep, "cpu", training=True) == 1
    assert layer_unroll_for(TINY.replace(scan_unroll=1), "cpu", training=True) == 1
    with pytest.raises(ValueError, match="scan_unroll"):
        TINY.replace(scan_unroll=-1)


@pytest.mark.slow
def test_unrolled_layers_equal_the_scan(x64):
    """`scan_unroll` changes how the layer loop compiles, not what it computes."""
    config = TINY.replace(dtype="float64", param_dtype="float64", scan_unroll=1)
    _assert_same_program_results(config, config.replace(scan_unroll=2), _tokens((2, 8)))


def _lowered_text(n_layers: int, *, grad: bool) -> str:
    config = TINY.replace(n_layers=n_layers, remat_policy="full", scan_unroll=1)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0))))

    def loss(state, tokens):
        return jnp.mean(nnx.merge(graphdef, state)(tokens).logits)

    fn = jax.grad(loss) if grad else loss
    return jax.jit(fn).lower(state, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text()


@pytest.mark.slow
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_layers_are_scanned_not_unrolled(grad):
    two, sixteen = _lowered_text(2, grad=grad), _lowered_text(16, grad=grad)
    assert len(sixteen) <= 1.2 * len(two), (len(two), len(sixteen))


@pytest.mark.slow
def test_jitter_key_changes_routing_only_with_eps():
    tokens = _tokens((2, 8))
    key = jax.random.key(0)
    plain = _model()
    np.testing.assert_array_equal(plain(tokens, jitter_key=key).logits, plain(tokens).logits)
    jittery = _model(TINY.replace(moe_jitter_eps=0.3))
    out = jittery(tokens, jitter_key=key)
    assert not np.allclose(out.router.logits_LBTE, jittery(tokens).router.logits_LBTE)


def test_unsupported_settings_are_refused():
    with pytest.raises(NotImplementedError, match="resid_pdrop=0.1: dropout is not implemented"):
        _model(TINY.replace(resid_pdrop=0.1))
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            _model(TINY.replace(dtype="float64"))
    with pytest.raises(ValueError, match="tokens_BT: expected integer ids"):
        _model()(jnp.zeros((2, 3)))


@pytest.mark.slow
def test_prefill_and_decode_are_the_training_forward_with_a_cache():
    """One block and one scan for every mode: a prompt's prefill plus token-by-token decoding
    through the cache give the logits and routing of one pass over the whole sequence, after left
    padding (segment 0)."""
    model = _model(TINY.replace(attention_impl="reference"))
    tokens = _tokens((2, 12))
    full = model(tokens)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens[1:, :5]], axis=1)
    prompts = jnp.concatenate([jnp.pad(tokens[:1, :5], ((0, 0), (3, 0))), padded])
    segments = jnp.asarray([[0, 0, 0] + [1] * 5] * 2)
    out = model(prompts, segment_ids_BT=segments, cache=KVCache.zeros(model.config, 2, 16))
    logits, experts = [out.logits[:, 3:]], [out.router.expert_ids_LBTA[:, :, 3:]]
    for t in range(5, 12):
        out = model(tokens[:, t : t + 1], cache=out.cache)
        logits.append(out.logits)
        experts.append(out.router.expert_ids_LBTA)
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(jnp.concatenate(experts, 2), full.router.expert_ids_LBTA)
    assert int(out.cache.length) == 15
    last = model(tokens[:, :5], cache=KVCache.zeros(model.config, 2, 8), last_only=True)
    np.testing.assert_allclose(last.logits[:, 0], full.logits[:, 4], atol=2e-5, rtol=2e-5)
