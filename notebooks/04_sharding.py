# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sharding DBRX over a device mesh
#
# Eight simulated CPU devices stand in for a GPU node or a TPU slice. We build the mesh, see
# where every parameter lives, size the released 132B model on several mesh shapes, and read the
# communication a compiled expert-parallel training step does.

# %%
import os

# Eight CPU devices, set before JAX starts (on real hardware, leave this out).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import collections
import pathlib
import re

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from dbrx_jax import Dbrx, DbrxConfig, data, memory, sharding, train

FIGURES = pathlib.Path("figures")
FIGURES.mkdir(exist_ok=True)
print(jax.devices())

# %% [markdown]
# ## The mesh
#
# Four named axes: `data` (replicated parameters), `fsdp` (parameters and optimizer state
# sharded, gathered layer by layer), `expert` (each device holds a slice of every layer's
# experts; elsewhere it shards the batch and the parameters as fsdp does) and `tensor` (heads
# and the experts' hidden dimension). Here fsdp 2 x expert 2 x tensor 2.

# %%
mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
print(dict(mesh.shape))
print(mesh.devices.reshape(2, 2, 2))

# %% [markdown]
# Every parameter is created with logical axis names; one table maps them to mesh axes. A mesh
# axis already used by an earlier dimension, of size 1, or not dividing the dimension is dropped.

# %%
for logical, mesh_axes in sharding.LOGICAL_RULES.items():
    print(f"{logical:14s} -> {mesh_axes}")

# %% [markdown]
# ## Where each parameter lives
#
# A model is built for its mesh (`Dbrx(..., mesh=mesh)`), and `shard_module` creates every
# parameter directly in its sharded layout (the full model never sits on one device). The
# table: logical axes, the resulting `PartitionSpec`, the block each device holds, and how many
# devices hold the same block.

# %%
config = DbrxConfig.preset("dbrx-small")
model = sharding.shard_module(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh), mesh)
print(f"{'parameter':20s} {'shape':19s} {'spec':50s} {'per device':18s} copies")
for path, param in nnx.iter_graph(model):
    if isinstance(param, nnx.Param):
        array = param[...]
        spec = array.sharding.spec
        block = array.addressable_shards[0].data.shape
        copies = mesh.size * int(np.prod(block)) // array.size
        name = ".".join(map(str, path))
        print(f"{name:20s} {array.shape!s:19s} {spec!s:50s} {block!s:18s} {copies}")

# %% [markdown]
# A picture of three of them: each rectangle is a block of the array (two of its dimensions),
# labelled with the devices that hold it. The embedding is split over the vocabulary (tensor)
# and d_model (fsdp x expert); the experts of a layer over experts and their hidden dimension,
# each block split once more along d_model by fsdp.


# %%
def draw_blocks(ax, array, dims, names, title):
    """Rectangles for the blocks of `array` over two of its dimensions, each labelled with the
    devices that hold (a part of) it."""
    blocks = collections.defaultdict(list)
    for shard in array.addressable_shards:
        rows, cols = (shard.index[d] for d in dims)
        key = tuple(
            (s.start or 0, s.stop or array.shape[d])
            for s, d in zip((rows, cols), dims, strict=True)
        )
        blocks[key].append(shard.device.id)
    colors = plt.cm.Pastel1(np.linspace(0, 1, len(blocks)))
    for color, (((r0, r1), (c0, c1)), devices) in zip(colors, sorted(blocks.items()), strict=True):
        ax.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, facecolor=color, edgecolor="k"))
        label = "devices\n" + ",".join(map(str, sorted(devices)))
        ax.text((c0 + c1) / 2, (r0 + r1) / 2, label, ha="center", va="center", fontsize=8)
    ax.set_xlim(0, array.shape[dims[1]])
    ax.set_ylim(array.shape[dims[0]], 0)
    ax.set_ylabel(f"{names[0]} ({array.shape[dims[0]]})")
    ax.set_xlabel(f"{names[1]} ({array.shape[dims[1]]})")
    ax.set_title(title, fontsize=10)


fig, axes = plt.subplots(1, 3, figsize=(14, 4))
draw_blocks(axes[0], model.wte[...], (0, 1), ("vocab", "d_model"), "wte [V, D]")
draw_blocks(axes[1], model.blocks.ffn.w1[...], (1, 3), ("expert", "F"), "w1 [L, E, D, F]: E x F")
draw_blocks(
    axes[2],
    model.blocks.attn.wqkv[...],
    (2, 1),
    ("kv head", "d_model"),
    "wqkv [L, D, K, J, H]: K x D",
)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## dbrx-132b on real meshes
#
# From shapes alone (`nnx.eval_shape`, nothing allocated). Training keeps fp32 parameters (the
# compute runs in bf16) and AdamW's two fp32 moments, sharded over meshes of 8 to 256 devices;
# serving holds the released bf16 weights plus a KV cache of 32k tokens for 8 sequences, on one
# 8-GPU node.

# %%
release = DbrxConfig.preset("dbrx-132b")
meshes = {
    "fsdp 8": {"fsdp": 8},
    "fsdp 8 x expert 8": {"fsdp": 8, "expert": 8},
    "expert 16 x tensor 8": {"expert": 16, "tensor": 8},
    "fsdp 16 x expert 16": {"fsdp": 16, "expert": 16},
}
training = release.replace(param_dtype="float32")
rows = {name: memory.memory_per_device(training, sizes) for name, sizes in meshes.items()}
for name, row in rows.items():
    print(
        f"{name:22s} {row['devices']:4d} devices: params {row['params_gib']:6.2f} GiB + "
        f"AdamW {row['optimizer_gib']:6.2f} GiB per device"
    )
serving = memory.inference_memory(release, {"tensor": 8}, batch=8, context=32768)
print(
    f"serving on tensor 8: params {serving['params_gib']:.2f} GiB + KV cache "
    f"{serving['kv_cache_gib']:.2f} GiB per device"
)

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
names = [*rows, "serve: tensor 8"]
params = [r["params_gib"] for r in rows.values()] + [serving["params_gib"]]
moments = [r["optimizer_gib"] for r in rows.values()] + [serving["kv_cache_gib"]]
ax.bar(names, params, label="parameters (fp32 training, bf16 serving)")
ax.bar(names, moments, bottom=params, label="AdamW moments (fp32) / KV cache (bf16)")
ax.axhline(80, color="gray", linestyle="--")
ax.text(len(names) - 0.5, 82, "80 GiB (H100)", ha="right", fontsize=8)
for i, (p, m) in enumerate(zip(params, moments, strict=True)):
    ax.text(i, p + m + 2, f"{p + m:.0f}", ha="center", fontsize=8)
ax.set_ylabel("GiB per device")
ax.set_title("dbrx-132b: memory per device by mesh")
ax.tick_params(axis="x", labelsize=8)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIGURES / "04_sharding.png", dpi=120)
plt.show()

# %% [markdown]
# ## dbrx-132b compiled for TPU slices
#
# The estimates above come from shapes. `experiments/aot_compile.py` compiles the real training and decode steps with the TPU compiler (libtpu, no TPU needed) and reads each device's memory from the compiled program. GiB per device:
#
# | step | slice | mesh | batch x seq | params | opt. state / KV cache | temporaries | total of HBM | headroom | roofline bound | compile |
# |---|---|---|---|---|---|---|---|---|---|---|
# | pretrain (fp32 master) | v5p-128 | fsdp 4 x expert 16 | 64 x 4096 | 7.7 | 15.3 | 42.4 | 65.4 of 95 | 31% | 1974 ms (compute) | 132 s |
# | pretrain (fp32 master) | v6e-256 | fsdp 16 x expert 16 | 256 x 4096 | 1.9 | 3.8 | 23.7 | 29.5 of 32 | 8% | 987 ms (compute) | 78 s |
# | fine-tune (bf16) | v5p-128 | fsdp 4 x expert 16 | 64 x 4096 | 3.8 | 7.7 | 29.8 | 41.4 of 95 | 56% | 1974 ms (compute) | 114 s |
# | decode | v5p-16 | expert 8 | 32 x 32768 | 30.6 | 20.0 | 1.2 | 51.8 of 95 | 45% | 20 ms (HBM bandwidth) | 5 s |
# | decode | v5p-16 | expert 8 | 1 x 32768 | 30.6 | 5.0 | 1.1 | 36.8 of 95 | 61% | 14 ms (HBM bandwidth) | 3 s |
# | decode | v6e-16 | expert 16 | 32 x 32768 | 15.3 | 10.0 | 1.1 | 26.5 of 32 | 17% | 17 ms (HBM bandwidth) | 5 s |
# | decode | v6e-16 | expert 16 | 1 x 32768 | 15.3 | 5.0 | 1.2 | 21.5 of 32 | 33% | 13 ms (HBM bandwidth) | 5 s |
# | pretrain (fp32 master), 2 micro-batches | v5p-64 | fsdp 2 x expert 16 | 64 x 4096 | 15.3 | 30.6 | 97.2 | 143 of 95: out of memory | - | - | 5 s |
#
# To reproduce a row: `python experiments/aot_compile.py --config=configs/dbrx_132b_pretrain.py --topology=v5p-128`; the README's "Compiling for TPU without a TPU" section has the decode commands.

# %% [markdown]
# ## The communication of an expert-parallel training step
#
# The forward and backward pass of a training step of a small model on data 2 x expert 4,
# compiled; we count the collectives in the optimised HLO. Which MoE path runs is decided when
# the model is built for its mesh, and `model.plan` says it: on this mesh the dropless dispatch
# runs under `shard_map`, each device holding a quarter of every layer's experts. With
# `moe_exchange="all_to_all"` each device sends every token to the devices that hold its
# experts and gets the results back (all-to-all); with `"all_gather"` the devices gather the
# tokens of the whole expert group and reduce-scatter the results. The rest (all-reduce of
# gradients over the batch axes, all-gathers of fsdp-style parameter shards) is GSPMD's.


# %%
def collectives(exchange):
    step_config = DbrxConfig.preset("dbrx-tiny", moe_impl="dropless", moe_exchange=exchange)
    ep_mesh = sharding.make_mesh({"data": 2, "expert": 4})
    model = sharding.shard_module(
        lambda: Dbrx(step_config, rngs=nnx.Rngs(0), mesh=ep_mesh), ep_mesh
    )
    print(model.plan.describe())
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = np.random.RandomState(0).randint(0, step_config.vocab_size, (8, 65))
    batch = sharding.shard_batch(data.model_batch(tokens), ep_mesh)

    def gradients(params, batch):
        return jax.grad(lambda p: train.loss_fn(nnx.merge(graphdef, p), batch)[0])(params)

    hlo = jax.jit(gradients).lower(params, batch).compile().as_text()
    ops = re.findall(
        r" (all-to-all|all-gather|reduce-scatter|all-reduce|collective-permute)(?:-start)?\(", hlo
    )
    return collections.Counter(ops), hlo


counts = {exchange: collectives(exchange) for exchange in ("all_to_all", "all_gather")}
print()
kinds = ["all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute"]
print(f"{'collective':20s} {'all_to_all':>11s} {'all_gather':>11s}")
for kind in kinds:
    print(f"{kind:20s} {counts['all_to_all'][0][kind]:11d} {counts['all_gather'][0][kind]:11d}")

# %% [markdown]
# The all-to-alls of the expert exchange, as XLA compiled them: the tokens out, their expert
# ids, the results back, and the two transposed exchanges of the backward pass. They sit in the
# body of the layer scan, so their number does not grow with depth. Each buffer has room for
# every assignment of the local batch (the worst case, all of them to one device), since an
# all-to-all's shapes are fixed at compile time.

# %%
for line in counts["all_to_all"][1].splitlines():
    if re.search(r" all-to-all\(", line):
        print(line.strip()[:150])
