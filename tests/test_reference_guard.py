"""Is the installed transformers DBRX itself right? Some releases broke its MoE block (expert
dims swapped). A short numpy forward of a 1-layer model, written from DBRX_REFERENCE.md with
the HF tensor names and layouts, must agree with it before it can serve as our reference."""

import numpy as np

from benchmarks import hf_reference
from dbrx_jax import DbrxConfig
from tests.float64_reference import float64_copy


def _layer_norm(x, w):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_forward(sd: dict[str, np.ndarray], c: DbrxConfig, tokens: np.ndarray) -> np.ndarray:
    """One sequence [T] -> logits [T, V], float64, straight from the HF state dict."""
    d, n, kv, hd = c.d_model, c.n_heads, c.kv_n_heads, c.head_dim
    E, F = c.moe_num_experts, c.ffn_hidden_size
    T = len(tokens)
    h = sd["transformer.wte.weight"][tokens]
    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(T)[:, None] * inv_freq
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(x):  # x [T, heads, hd]
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    for i in range(c.n_layers):
        p = f"transformer.blocks.{i}."
        x = _layer_norm(h, sd[p + "norm_attn_norm.norm_1.weight"])
        qkv = x @ sd[p + "norm_attn_norm.attn.Wqkv.weight"].T
        if c.clip_qkv is not None:
            qkv = np.clip(qkv, -c.clip_qkv, c.clip_qkv)
        q = rope(qkv[:, :d].reshape(T, n, hd))
        k = rope(qkv[:, d : d + kv * hd].reshape(T, kv, hd))
        v = qkv[:, d + kv * hd :].reshape(T, kv, hd)
        out = np.zeros((T, n, hd))
        for head in range(n):
            g = head // (n // kv)
            scores = q[:, head] @ k[:, g].T / np.sqrt(hd)
            scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
            out[:, head] = _softmax(scores) @ v[:, g]
        h = h + out.reshape(T, d) @ sd[p + "norm_attn_norm.attn.out_proj.weight"].T
        x = _layer_norm(h, sd[p + "norm_attn_norm.norm_2.weight"])
        probs = _softmax(x @ sd[p + "ffn.router.layer.weight"].T)
        w1 = sd[p + "ffn.experts.mlp.w1"].reshape(E, F, d)
        v1 = sd[p + "ffn.experts.mlp.v1"].reshape(E, F, d)
        w2 = sd[p + "ffn.experts.mlp.w2"].reshape(E, F, d)
        y = np.zeros_like(x)
        for t in range(T):
            top = np.argsort(-probs[t])[: c.moe_top_k]
            weights = probs[t, top] / probs[t, top].sum()
            for e, wgt in zip(top, weights, strict=True):
                gate = x[t] @ w1[e].T
                hidden = gate / (1 + np.exp(-gate)) * (x[t] @ v1[e].T)
                y[t] += wgt * (hidden @ w2[e])  # w2 is [F, d]: not transposed
        h = h + y
    return _layer_norm(h, sd["transformer.norm_f.weight"]) @ sd["lm_head.weight"].T


def test_transformers_dbrx_matches_numpy_forward():
    config = DbrxConfig(
        d_model=32,
        n_heads=4,
        kv_n_heads=2,
        n_layers=1,
        vocab_size=64,
        max_seq_len=32,
        ffn_hidden_size=24,
        moe_num_experts=4,
        moe_top_k=2,
        clip_qkv=1.0,
        rope_theta=10000.0,
    )
    model = float64_copy(hf_reference.hf_model(config, seed=5), config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (1, 10))
    ref, _ = hf_reference.run(model, tokens)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = numpy_forward(sd, config, tokens[0])
    assert np.abs(ours - ref[0]).max() <= 1e-9 * np.abs(ref).max()
