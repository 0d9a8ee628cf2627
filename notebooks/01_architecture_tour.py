# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the DBRX architecture
#
# Build a model from a preset and look at its parameters; count the parameters of every preset,
# the released 132B model included, without allocating them; then walk one block step by step:
# the fused QKV projection and its clipping, rotary embeddings, grouped-query attention, the
# router and the experts, checking each step against the block itself.

# %%
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import dbrx_jax
from dbrx_jax import PRESETS, Dbrx, DbrxConfig
from dbrx_jax.model import layers

FIGURES = pathlib.Path("figures")
FIGURES.mkdir(exist_ok=True)

# %% [markdown]
# ## The parameter tree
#
# Every block parameter has a leading layer axis: the blocks are created with `nnx.vmap` and run
# under `jax.lax.scan`, so compile time does not grow with depth. The last column is each
# parameter's logical axes, which the sharding rules map onto a device mesh (notebook 04).
#
# A model is built for a mesh, here none (one device): its MoE execution plan, which dispatch and
# grouped GEMM the expert layers run, is decided then and kept in `model.plan`.

# %%
config = DbrxConfig.preset("dbrx-tiny")
model = Dbrx(config, rngs=nnx.Rngs(0))
for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param):
        name = ".".join(map(str, path))
        print(f"{name:22s} {param.shape!s:22s} {param.get_metadata('logical_axes')}")
print(model.plan.describe())

# %% [markdown]
# ## Parameter counts of every preset
#
# `nnx.eval_shape` builds a model as shapes only, so counting the 132B release costs nothing. The
# active count is what one token touches: 4 of the 16 experts in every layer.

# %%
rows = []
for name, preset in PRESETS.items():
    abstract = nnx.eval_shape(lambda preset=preset: Dbrx(preset, rngs=nnx.Rngs(0)))
    counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == preset.num_params()
    rows.append((name, preset.n_layers, preset.d_model, counted, preset.num_active_params()))
print(f"{'preset':11s} {'layers':>6s} {'d_model':>7s} {'parameters':>17s} {'active':>16s}")
for name, n_layers, d_model, total, active in rows:
    print(f"{name:11s} {n_layers:6d} {d_model:7d} {total:17,d} {active:16,d}")

# %% [markdown]
# Where the 132B parameters are: the experts hold 96% of them, but a token uses only a quarter of
# the experts, so 36B parameters are active.

# %%
release = DbrxConfig.preset("dbrx-132b")
D, F, E, A = release.d_model, release.ffn_hidden_size, release.moe_num_experts, release.moe_top_k
L, V = release.n_layers, release.vocab_size
H, K = release.head_dim, release.kv_n_heads
parts = {
    "embedding + lm_head": (2 * V * D, 2 * V * D),
    "attention": (L * (D * (D + 2 * K * H) + D * D),) * 2,
    "router + norms": (L * (D * E + 2 * D) + D,) * 2,
    "experts": (L * 3 * E * D * F, L * 3 * A * D * F),
}
assert sum(t for t, _ in parts.values()) == release.num_params()
assert sum(a for _, a in parts.values()) == release.num_active_params()
fig, ax = plt.subplots(figsize=(9, 3))
left = np.zeros(2)
for label, (total, active) in parts.items():
    widths = np.array([total, active]) / 1e9
    ax.barh(["total", "active per token"], widths, left=left, label=label)
    left += widths
for y, value in enumerate(left):
    ax.text(value + 1, y, f"{value:.1f}B", va="center")
ax.set_xlabel("parameters (billions)")
ax.set_xlim(0, 150)
ax.set_title("dbrx-132b: where the parameters are")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "01_parameters.png", dpi=120)
plt.show()

# %% [markdown]
# ## One block, step by step
#
# Take layer 0 out of the stacked blocks (index the layer axis of every parameter) and run a
# short batch through it by hand. Shapes are in the names: B batch, T tokens (queries), S key
# positions, D model width, N query heads, K key/value heads, G = N / K query heads per KV head,
# J = G + 2 fused-QKV slots per KV head, H head size, E experts, A active experts per token,
# F expert hidden size, L layers (the package-wide legend is in `dbrx_jax/model/__init__.py`).

# %%
block_def, block_state = nnx.split(model.blocks)
block = nnx.merge(block_def, jax.tree.map(lambda x: x[0], block_state))
tokens_BT = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 10)))
h_BTD = model.wte[...][tokens_BT]
print("embedded tokens h_BTD", h_BTD.shape)

# %% [markdown]
# **Fused QKV with clipping.** `wqkv` is `[D, K, G + 2, H]`: for each KV head its G query heads,
# then its key and value. The whole projection is clipped to `[-clip_qkv, clip_qkv]` before
# RoPE. To see the clip at work we scale the input up until some entries exceed it.

# %%
x_BTD = block.norm_1(h_BTD)
qkv_BTKJH = jnp.einsum("BTD,DKJH->BTKJH", 40.0 * x_BTD, block.attn.wqkv[...])
clipped = jnp.clip(qkv_BTKJH, -config.clip_qkv, config.clip_qkv)
print("wqkv", block.attn.wqkv.shape, "-> qkv_BTKJH", qkv_BTKJH.shape)
print(
    f"at 40x the input, {float(jnp.mean(jnp.abs(qkv_BTKJH) > config.clip_qkv)):.1%} of "
    f"the entries exceed clip_qkv={config.clip_qkv} and are clipped; "
    f"max |qkv| {float(jnp.abs(qkv_BTKJH).max()):.1f} -> {float(jnp.abs(clipped).max()):.1f}"
)

# %% [markdown]
# **Rotary embeddings (GPT-NeoX style).** Each pair (i, i + H/2) of a query or key is rotated by
# an angle proportional to the position, with frequencies `theta ** (-2i / H)`. Rotations keep
# norms and make `q . k` depend only on the distance between the two positions. Here on the
# unscaled input: project, clip, split the fused slots into queries, keys and values, rotate q
# and k.

# %%
B, T, _ = h_BTD.shape
G = config.n_kv_groups
positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
cos_BTH, sin_BTH = layers.rope_tables(positions_BT, config.head_dim, config.rope_theta, jnp.float32)
qkv_BTKJH = jnp.clip(
    jnp.einsum("BTD,DKJH->BTKJH", x_BTD, block.attn.wqkv[...]), -config.clip_qkv, config.clip_qkv
)
q_BTNH = layers.apply_rope(
    qkv_BTKJH[:, :, :, :G].reshape(B, T, config.n_heads, config.head_dim), cos_BTH, sin_BTH
)
k_BTKH = layers.apply_rope(qkv_BTKJH[:, :, :, G], cos_BTH, sin_BTH)
v_BTKH = qkv_BTKJH[:, :, :, G + 1]
print("q_BTNH", q_BTNH.shape, " k_BTKH", k_BTKH.shape, " v_BTKH", v_BTKH.shape)

rng = np.random.RandomState(1)
q_H, k_H = rng.randn(config.head_dim), rng.randn(config.head_dim)


def rotated_dot(pos_q, pos_k):
    def rot(x_H, pos):
        cos, sin = layers.rope_tables(
            jnp.full((1, 1), pos), config.head_dim, config.rope_theta, jnp.float32
        )
        return layers.apply_rope(jnp.asarray(x_H, jnp.float32)[None, None, None], cos, sin)

    return float(jnp.vdot(rot(q_H, pos_q), rot(k_H, pos_k)))


print(
    "q.k at positions (3, 1), (10, 8), (100, 98):",
    [round(rotated_dot(p, p - 2), 4) for p in (3, 10, 100)],
)

# %% [markdown]
# **Grouped-query attention.** Query head n reads key/value head n // G. By hand: group the
# queries by their KV head, apply the causal mask, softmax in fp32, and compare with the
# library's attention.

# %%
q_BTKGH = q_BTNH.reshape(B, T, config.kv_n_heads, G, config.head_dim)
scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BTKH) / np.sqrt(config.head_dim)
scores_BKGTS = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores_BKGTS, -jnp.inf)
probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
by_hand_BTNH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BTKH).reshape(q_BTNH.shape)
library_BTNH = layers.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, None, impl="xla")
print(f"{config.n_heads} query heads share {config.kv_n_heads} KV heads (G={G})")
print("max |by hand - library|:", float(jnp.abs(by_hand_BTNH - library_BTNH).max()))
h_BTD = h_BTD + jnp.einsum("BTNH,NHD->BTD", by_hand_BTNH, block.attn.out[...])

# %% [markdown]
# **The router.** A linear map to E logits, a softmax over all E experts in fp32, the top A
# probabilities, renormalised to sum to 1 (`moe_normalize_expert_weights=1`).

# %%
x_BTD = block.norm_2(h_BTD)
logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD, block.ffn.router[...])
probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
weights_BTA, experts_BTA = jax.lax.top_k(probs_BTE, config.moe_top_k)
weights_BTA = weights_BTA / weights_BTA.sum(-1, keepdims=True)
print("router", block.ffn.router.shape, "-> probs_BTE", probs_BTE.shape)
print("token 0 goes to experts", experts_BTA[0, 0], "with weights", np.round(weights_BTA[0, 0], 3))

# %% [markdown]
# **The experts.** Each is a GLU, `(act(x W1) * (x V1)) W2`, with the weights stored as real
# `[E, D, F]`, `[E, D, F]` and `[E, F, D]` arrays. The layer's output is the weighted sum over
# the chosen experts. Here by gathering each token's expert weights (the simplest correct
# form); the library sorts tokens by expert and runs grouped GEMMs instead
# (`dbrx_jax/moe/dispatch.py`; `model.plan` above says which path runs).

# %%
w1_EDF, v1_EDF, w2_EFD = (w[...] for w in (block.ffn.w1, block.ffn.v1, block.ffn.w2))
print("w1", w1_EDF.shape, " v1", v1_EDF.shape, " w2", w2_EFD.shape)
gate_BTAF = jax.nn.silu(jnp.einsum("BTD,BTADF->BTAF", x_BTD, w1_EDF[experts_BTA]))
up_BTAF = jnp.einsum("BTD,BTADF->BTAF", x_BTD, v1_EDF[experts_BTA])
y_BTAD = jnp.einsum("BTAF,BTAFD->BTAD", gate_BTAF * up_BTAF, w2_EFD[experts_BTA])
h_BTD = h_BTD + jnp.einsum("BTA,BTAD->BTD", weights_BTA, y_BTAD)

# %% [markdown]
# The hand-built block against the model's own block:

# %%
block_out_BTD, router, _ = block(model.wte[...][tokens_BT], cos_BTH, sin_BTH, None)
print("max |by hand - block|:", float(jnp.abs(h_BTD - block_out_BTD).max()))
print("same experts chosen:", bool((router.expert_ids_BTA == experts_BTA).all()))

# %% [markdown]
# ## The whole model
#
# A forward pass returns the logits and every layer's routing, stacked (`out.router`, a
# `Routing`: router logits `[L, B, T, E]`, the chosen experts and their weights `[L, B, T, A]`),
# which the load-balancing loss reads. Packed sequences: segment ids keep attention inside each
# document and restart the RoPE positions, so a packed row gives the same logits as its
# documents run one by one.

# %%
out = nnx.jit(lambda m, t: m(t))(model, tokens_BT)
print("logits", out.logits.shape, " router logits per layer", out.router.logits_LBTE.shape)
print(
    "load-balancing loss (1.0 = balanced):",
    float(dbrx_jax.load_balancing_loss(out.router, config.moe_num_experts)),
)
a, b = tokens_BT[:1, :4], tokens_BT[1:, :6]
packed = model(jnp.concatenate([a, b], 1), segment_ids_BT=jnp.asarray([[1] * 4 + [2] * 6]))
print(
    "packed vs separate, max |difference|:",
    float(jnp.abs(packed.logits[:, 4:] - model(b).logits).max()),
)
