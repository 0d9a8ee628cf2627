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
# # A tour of the DBRX model
#
# Build a tiny DBRX, look at its parameters (the full 132B model too, without allocating it),
# run it, and see which experts every token was routed to.

# %%
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dbrx_jax
from dbrx_jax import Dbrx, DbrxConfig

config = DbrxConfig.preset("dbrx-tiny")
model = Dbrx(config, rngs=nnx.Rngs(0))
for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param):
        name = ".".join(map(str, path))
        print(f"{name:22s} {param.shape!s:22s} {param.get_metadata('logical_axes')}")

# %% [markdown]
# Every block parameter has a leading layer axis: the blocks run under `jax.lax.scan`.
# The released model has the same structure; `nnx.eval_shape` builds it as shapes only.

# %%
full = nnx.eval_shape(lambda: Dbrx(DbrxConfig.preset("dbrx-132b"), rngs=nnx.Rngs(0)))
n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(full)))
print(
    f"dbrx-132b: {n_params:,} parameters, "
    f"{DbrxConfig.preset('dbrx-132b').num_active_params():,} active per token"
)

# %% [markdown]
# A forward pass returns the logits and, per layer, the router's decisions.

# %%
tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (2, 12)), jnp.int32)
out = nnx.jit(lambda m, t: m(t))(model, tokens)
print("logits", out.logits.shape)
print(
    "experts of token 0, layer 0:",
    out.router.expert_ids_BTA[0, 0, 0],
    "weights",
    np.round(out.router.weights_BTA[0, 0, 0], 3),
)
counts = np.bincount(
    np.asarray(out.router.expert_ids_BTA[0]).ravel(), minlength=config.moe_num_experts
)
print("layer 0 assignments per expert:", counts)
print(
    "load-balancing loss (1.0 = balanced):",
    float(dbrx_jax.load_balancing_loss(out.router, config.moe_num_experts)),
)

# %% [markdown]
# Packed sequences: segment ids keep attention inside each document and restart the RoPE
# positions, so a packed row gives the same logits as its documents run one by one.

# %%
a, b = tokens[:1, :5], tokens[1:, :7]
packed = model(jnp.concatenate([a, b], 1), segment_ids_BT=jnp.asarray([[1] * 5 + [2] * 7]))
print(
    "max difference to separate runs:", float(jnp.abs(packed.logits[:, 5:] - model(b).logits).max())
)
