"""Parity with the real transformers.DbrxForCausalLM, loaded through our `from_pretrained`."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import dbrx_jax
from benchmarks import hf_reference
from dbrx_jax import DbrxConfig
from dbrx_jax.io.pretrained import hf_state_dict
from tests.float64_reference import float64_copy

TINY = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64, ffn_hidden_size=48)
CONFIGS = {
    # DBRX's routing (16 experts, top-4), GQA, clipping active, the release's RoPE base.
    "e16k4_gqa_clip": DbrxConfig(
        **TINY, kv_n_heads=2, clip_qkv=1.0, rope_theta=500000.0, moe_num_experts=16, moe_top_k=4
    ),
    # Switch-style top-1 over 4 experts, full multi-head attention, no clipping.
    "e4k1_mha_noclip": DbrxConfig(
        **TINY, kv_n_heads=4, clip_qkv=None, rope_theta=10000.0, moe_num_experts=4, moe_top_k=1
    ),
    # Multi-query attention, hard clipping, three layers.
    "e8k2_mqa_clip": DbrxConfig(
        **{**TINY, "n_layers": 3},
        kv_n_heads=1,
        clip_qkv=0.5,
        rope_theta=10000.0,
        moe_num_experts=8,
        moe_top_k=2,
    ),
    # The p=2 renormalisation of the expert weights.
    "e16k4_p2": DbrxConfig(
        **TINY,
        kv_n_heads=4,
        clip_qkv=None,
        rope_theta=500000.0,
        moe_num_experts=16,
        moe_top_k=4,
        moe_normalize_expert_weights=2.0,
    ),
}
LENGTHS = (12, 7, 10)  # batch of three, right-padded to 12


def _batch(config, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, config.vocab_size, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return tokens.astype(np.int32), mask


@nnx.jit
def _forward(model, tokens_BT, segment_ids_BT):
    return model(tokens_BT, segment_ids_BT=segment_ids_BT)


def _ours(hf_dir, tokens, mask, **kwargs):
    model = dbrx_jax.from_pretrained(hf_dir, **kwargs)
    out = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(out.logits), np.asarray(out.router.expert_ids_LBTA)


_CASES = {}


def _case(name, tmp_path_factory):
    """The saved HF checkpoint of a config, a batch, and the reference's results (built once)."""
    if name not in _CASES:
        config = CONFIGS[name]
        model32 = hf_reference.hf_model(config, seed=1)
        hf_dir = tmp_path_factory.mktemp(name)
        model32.save_pretrained(hf_dir)
        tokens, mask = _batch(config)
        ref64, router64 = hf_reference.run(float64_copy(model32, config), tokens, mask)
        ref32, _ = hf_reference.run(model32, tokens, mask)
        _CASES[name] = dict(
            config=config,
            hf_dir=hf_dir,
            tokens=tokens,
            mask=mask.astype(bool),
            ref64=ref64,
            router64=router64,
            ref32=ref32,
        )
    return _CASES[name]


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


def _rel_err(a, b, mask):
    """Max abs difference over the real (unpadded) positions, relative to the logit scale."""
    return np.abs(a[mask] - b[mask]).max() / np.abs(b[mask]).max()


def _rel_rms(a, b, mask):
    return np.sqrt(np.mean((a[mask] - b[mask]) ** 2) / np.mean(b[mask] ** 2))


def test_float64_exact(case, x64):
    ours, _ = _ours(
        case["hf_dir"], case["tokens"], case["mask"], dtype="float64", attention_impl="reference"
    )
    err = _rel_err(ours, case["ref64"], case["mask"])
    print(f"float64 max |ours - transformers| / max |logit| = {err:.2e}")
    assert err <= 1e-9


def test_float32_error_within_3x_transformers(case):
    """Both float32 runs against the float64 result. Compared by RMS: the max is set by a single
    position and swings between 0.5x and 3.2x from seed to seed (the RMS: 0.5x to 2.3x)."""
    ours, _ = _ours(case["hf_dir"], case["tokens"], case["mask"], dtype="float32")
    ours_rms = _rel_rms(ours, case["ref64"], case["mask"])
    hf_rms = _rel_rms(case["ref32"], case["ref64"], case["mask"])
    print(
        f"float32 vs float64, relative RMS: ours {ours_rms:.2e}, transformers {hf_rms:.2e}; "
        f"max: ours {_rel_err(ours, case['ref64'], case['mask']):.2e}, "
        f"transformers {_rel_err(case['ref32'], case['ref64'], case['mask']):.2e}"
    )
    assert ours_rms <= 3 * hf_rms


def test_routing_matches(case, x64):
    _, expert_ids = _ours(
        case["hf_dir"], case["tokens"], case["mask"], dtype="float64", attention_impl="reference"
    )
    k = case["config"].moe_top_k
    ref_ids = np.argsort(-case["router64"], axis=-1)[..., :k]
    mask = case["mask"]
    np.testing.assert_array_equal(np.sort(expert_ids, -1)[:, mask], np.sort(ref_ids, -1)[:, mask])
    for layer in np.sort(expert_ids, -1)[:, mask]:  # the routing really varies between tokens
        assert len({tuple(s) for s in layer}) > 1


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.clip_qkv is not None])
def test_clipping_is_active(name, tmp_path_factory, x64):
    case = _case(name, tmp_path_factory)
    unclipped, _ = _ours(
        case["hf_dir"],
        case["tokens"],
        case["mask"],
        dtype="float64",
        attention_impl="reference",
        clip_qkv=None,
    )
    assert _rel_err(unclipped, case["ref64"], case["mask"]) > 1e-3


def _successor_batch(rng, successor, batch=8, length=33, noise=0.1):
    """Sequences following a fixed random successor map, with 10% of tokens replaced at random."""
    x = np.empty((batch, length), np.int32)
    x[:, 0] = rng.randint(0, len(successor), batch)
    for t in range(1, length):
        x[:, t] = successor[x[:, t - 1]]
    flip = rng.rand(batch, length) < noise
    x[flip] = rng.randint(0, len(successor), flip.sum())
    return x


@pytest.mark.slow
def test_bfloat16_top1_agreement_on_a_trained_model(tmp_path):
    """Random weights give near-tied logits, where bfloat16 flips the argmax for any
    implementation; a model with real predictions is the meaningful case. So: train a tiny model
    here for a few steps, export it to transformers (which checks our HF layouts once more),
    and compare our bfloat16 forward with transformers' float32 one."""
    config = DbrxConfig.preset("dbrx-tiny", vocab_size=128)
    model = dbrx_jax.Dbrx(config, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    successor = rng.permutation(config.vocab_size)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss_fn(model):
            logits = model(x[:, :-1]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [
        float(train_step(model, optimizer, _successor_batch(rng, successor))) for _ in range(80)
    ]
    assert losses[-1] < 0.5 * losses[0]

    reference = hf_reference.hf_model(config)
    reference.load_state_dict({k: torch.tensor(v) for k, v in hf_state_dict(model).items()})
    tokens = _successor_batch(rng, successor)
    ref32, _ = hf_reference.run(reference, tokens)
    ours32 = np.asarray(model(jnp.asarray(tokens)).logits)
    assert np.abs(ours32 - ref32).max() <= 1e-5 * np.abs(ref32).max()

    reference.save_pretrained(tmp_path)
    model16 = dbrx_jax.from_pretrained(tmp_path, dtype=jnp.bfloat16)  # the way JAX spells it
    assert model16.wte[...].dtype == jnp.bfloat16 and model16.config.dtype == "bfloat16"
    logits16 = nnx.jit(lambda m, t: m(t).logits)(model16, jnp.asarray(tokens))
    agreement = (np.asarray(logits16.astype(jnp.float32)).argmax(-1) == ref32.argmax(-1)).mean()
    print(f"bfloat16 top-1 agreement with transformers float32: {agreement:.4f}")
    assert agreement >= 0.99


def test_bfloat16_no_worse_than_transformers_bfloat16(tmp_path):
    """On a random model with large weights (near-tied logits, routing flips) the bar is the
    reference's own bfloat16 run: ours agrees with float32 at least as often, within 3%."""
    config = DbrxConfig.preset("dbrx-tiny", vocab_size=128)
    model32 = hf_reference.hf_model(config, seed=2)
    model32.save_pretrained(tmp_path)
    tokens = np.random.RandomState(3).randint(0, config.vocab_size, (4, 64)).astype(np.int32)
    ref32, _ = hf_reference.run(model32, tokens)
    ref16, _ = hf_reference.run(hf_reference.hf_model(config, seed=2).to(torch.bfloat16), tokens)
    ours16 = nnx.jit(lambda m, t: m(t).logits)(
        dbrx_jax.from_pretrained(tmp_path, dtype="bfloat16"), jnp.asarray(tokens)
    )
    ours_agree = (np.asarray(ours16.astype(jnp.float32)).argmax(-1) == ref32.argmax(-1)).mean()
    hf_agree = (ref16.argmax(-1) == ref32.argmax(-1)).mean()
    print(
        f"top-1 agreement with float32: ours bf16 {ours_agree:.4f}, transformers bf16 "
        f"{hf_agree:.4f}"
    )
    assert ours_agree >= hf_agree - 0.03


def test_param_dtype_separate_from_compute_dtype(tmp_path):
    config = DbrxConfig.preset("dbrx-tiny", vocab_size=128)
    hf_reference.hf_model(config).save_pretrained(tmp_path)
    model = dbrx_jax.from_pretrained(tmp_path, dtype="bfloat16", param_dtype="float32")
    assert model.blocks.ffn.w1[...].dtype == jnp.float32
    out = model(jnp.zeros((1, 4), jnp.int32))
    assert out.logits.dtype == jnp.bfloat16
    assert out.router.logits_LBTE.dtype == jnp.float32  # the router works in fp32
