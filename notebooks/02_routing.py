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
# # How tokens are routed
#
# Train a small DBRX on the embedded corpus (the King James Bible) for a few hundred steps, or
# pick up the `make train` run if there is one, then look at its router: the load of every
# expert in every layer, the router's entropy over training, the spread of tokens over experts,
# and which tokens go to which expert.

# %%
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import dbrx_jax
from dbrx_jax import data, experiment, state, train
from dbrx_jax.tokenizer import load_tokenizer

FIGURES = pathlib.Path("figures")
FIGURES.mkdir(exist_ok=True)

# %% [markdown]
# ## A trained model
#
# `make train` leaves its run in `runs/demo` (a 4-layer model, 550 steps). Without it we train
# `dbrx-tiny` (2 layers, 16 experts, top-4) for 300 steps here, which takes a minute or two on a
# laptop. Either way the run is an ordinary training directory: `metrics.jsonl`, Orbax
# checkpoints, the tokenizer.

# %%
demo = pathlib.Path("../runs/demo")
if (demo / "checkpoints").is_dir() and any((demo / "checkpoints").iterdir()):
    workdir = demo
    print("using the `make train` run in", workdir)
else:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="routing-"))
    config = experiment.base_config()
    config.unlock()
    config.model = experiment.model_section("dbrx-tiny")
    config.total_steps = 300
    config.batch_size = 8
    config.seq_len = 64
    config.learning_rate = 5e-3
    config.warmup_steps = 20
    config.log_every_steps = 10
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 300
    config.data.spm_vocab_size = 512
    config.lock()
    summary = train.train(config, str(workdir), progress=False)
    first, last = summary["first_loss"], summary["last_loss"]
    print(f"loss {first:.2f} -> {last:.2f} in {summary['wall_s']:.0f} s")

# %%
export = workdir / "export"
if not export.exists():
    state.export_from_workdir(str(workdir), str(export))
model = dbrx_jax.from_pretrained(str(export))
run = json.loads((workdir / "config.json").read_text())
tokenizer = load_tokenizer(run["tokenizer"])
config = model.config
L, E, A = config.n_layers, config.moe_num_experts, config.moe_top_k
print(f"{L} layers, {E} experts, top-{A}; vocabulary of {tokenizer.vocab_size}")

# %% [markdown]
# ## The router during training
#
# Every logged step records, per layer, the mean entropy of the router's distribution over the
# 16 experts and the share of assignments taken by the busiest expert. A uniform router has
# entropy ln 16 = 2.77 nats and every expert gets 1/16 of the work; the load-balancing loss
# keeps the router spread out while it learns to specialise.

# %%
rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "router_entropy" in r]
steps = np.array([r["step"] for r in rows])
entropy_by_step = np.array([r["router_entropy"] for r in rows])  # [logged steps, L]
busiest_by_step = np.array([r["expert_load_max"] for r in rows])  # [logged steps, L]

# %% [markdown]
# ## Expert load on held-out text
#
# Run the trained model over the held-out split and count, per layer, how many assignments each
# expert receives (each token makes A = 4).

# %%
documents = data.load_documents(run["experiment"]["data"]["source"])
eval_batches = data.make_dataset(
    documents, run["tokenizer"], seq_len=128, batch_size=8, seed=0, split="eval"
)
forward = jax.jit(lambda m, b: m(b["inputs"], segment_ids_BT=b["segment_ids"]))
counts_LE = np.zeros((L, E))
top1_tokens = []  # (layer, expert, token id) of every real token
for i, batch in enumerate(eval_batches):
    if i == 8:
        break
    out = forward(model, batch)
    mask_BT = batch["segment_ids"] != 0
    stats = dbrx_jax.moe_stats(out.router, E, jnp.asarray(mask_BT))
    counts_LE += np.asarray(stats.tokens_per_expert_LE)
    experts_LBTA = np.asarray(out.router.expert_ids_LBTA)
    for layer in range(L):
        top1_tokens.append(
            np.stack(
                [
                    np.full(mask_BT.sum(), layer),
                    experts_LBTA[layer, ..., 0][mask_BT],
                    batch["inputs"][mask_BT],
                ],
                axis=1,
            )
        )
top1_tokens = np.concatenate(top1_tokens)
share_LE = counts_LE / counts_LE.sum(-1, keepdims=True)
print(f"{int(counts_LE[0].sum()) // A} held-out tokens")
print("busiest expert / mean, per layer:", np.round(share_LE.max(-1) * E, 2))

# %%
fig, (ax_heat, ax_entropy) = plt.subplots(1, 2, figsize=(12, 3.6), width_ratios=[1.3, 1])
image = ax_heat.imshow(share_LE * E, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
ax_heat.set_xlabel("expert")
ax_heat.set_ylabel("layer")
ax_heat.set_xticks(range(E))
ax_heat.set_yticks(range(L))
ax_heat.set_title("expert load on held-out text (1.0 = an even share)")
for layer in range(L):
    for expert in range(E):
        ax_heat.text(
            expert,
            layer,
            f"{share_LE[layer, expert] * E:.1f}",
            ha="center",
            va="center",
            fontsize=7,
        )
fig.colorbar(image, ax=ax_heat)
for layer in range(L):
    ax_entropy.plot(steps, entropy_by_step[:, layer], label=f"layer {layer}")
ax_entropy.axhline(np.log(E), color="gray", linestyle="--", label=f"uniform (ln {E})")
ax_entropy.set_xlabel("training step")
ax_entropy.set_ylabel("router entropy (nats)")
ax_entropy.set_title("the router sharpens as it trains")
ax_entropy.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "02_routing.png", dpi=120)
plt.show()

# %% [markdown]
# The busiest expert's share over training, per layer: the auxiliary loss holds it near 1/16.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for layer in range(L):
    ax.plot(steps, busiest_by_step[:, layer] * E, label=f"layer {layer}")
ax.axhline(1.0, color="gray", linestyle="--")
ax.set_xlabel("training step")
ax.set_ylabel("busiest expert / even share")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Tokens per expert
#
# The same counts as histograms: how many of the held-out assignments each expert received,
# experts sorted from busiest to idlest, one panel per layer.

# %%
fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 2.8), sharey=True, squeeze=False)
for layer, ax in enumerate(axes[0]):
    order = np.argsort(-counts_LE[layer])
    ax.bar(range(E), counts_LE[layer, order])
    ax.axhline(counts_LE[layer].mean(), color="gray", linestyle="--")
    ax.set_xticks(range(E), order, fontsize=6)
    ax.set_title(f"layer {layer}")
    ax.set_xlabel("expert")
axes[0, 0].set_ylabel("assignments")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Which tokens go to which expert
#
# For every expert of the last layer, the tokens it most often receives as a token's first
# choice, with the share of that token's occurrences routed there. (A piece that starts a word
# and the same letters inside a word are different tokens that print alike.)

# %%
last = top1_tokens[top1_tokens[:, 0] == L - 1]
token_totals = np.bincount(last[:, 2], minlength=tokenizer.vocab_size)
for expert in range(E):
    ids = last[last[:, 1] == expert, 2]
    if not len(ids):
        print(f"expert {expert:2d}: (no first choices)")
        continue
    counts = np.bincount(ids, minlength=tokenizer.vocab_size)
    top = np.argsort(-counts)[:6]
    words = ", ".join(
        f"{tokenizer.decode([int(t)])!r} {counts[t] / token_totals[t]:.0%}"
        for t in top
        if counts[t]
    )
    print(f"expert {expert:2d} ({len(ids):5d} tokens): {words}")

# %% [markdown]
# And one verse, token by token: each cell is the expert a token chose first in that layer.

# %%
verse = "In the beginning God created the heaven and the earth."
ids = tokenizer.encode(verse)
out = model(jnp.asarray([ids]))
first_LT = np.asarray(out.router.expert_ids_LBTA[:, 0, :, 0])
fig, ax = plt.subplots(figsize=(0.6 * len(ids) + 1, 0.5 * L + 1))
ax.imshow(first_LT, cmap="tab20", vmin=0, vmax=19, aspect="auto")
for layer in range(L):
    for t in range(len(ids)):
        ax.text(t, layer, first_LT[layer, t], ha="center", va="center", fontsize=8)
ax.set_xticks(range(len(ids)), [tokenizer.decode([i]) for i in ids], rotation=60, fontsize=8)
ax.set_yticks(range(L), [f"layer {i}" for i in range(L)])
ax.set_title("first-choice expert of every token")
fig.tight_layout()
plt.show()
