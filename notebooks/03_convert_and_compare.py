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
# # From transformers to dbrx_jax and back
#
# The released DBRX is a Hugging Face directory: `config.json` plus safetensors shards. Here a
# tiny random `transformers` DBRX plays the release: we convert it with the streaming converter,
# compare our logits and routing with the reference's, generate from both, and export back to
# the Hugging Face format to show the round trip is exact. (`transformers` and `torch` are only
# needed for the comparison; dbrx_jax itself never imports them.)
#
# The reference comes from `benchmarks/hf_reference.py`, the one place that builds a
# transformers DBRX from a `DbrxConfig`: the parity tests and the benchmarks use the same
# builder, so this notebook compares with exactly the model they check. `benchmarks/` is not
# installed with the library; it imports from the repository root (`make notebooks` puts the
# root on the kernel's path; the `sys.path` line below does it for a Jupyter started in
# `notebooks/`).

# %%
import json
import pathlib
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import safetensors.numpy
import torch
from absl import logging as absl_logging

import dbrx_jax
from dbrx_jax.generate import generate
from dbrx_jax.io import convert

sys.path.append(str(pathlib.Path.cwd().parent))  # the repository root, for benchmarks/
with warnings.catch_warnings():  # transformers' tqdm.auto notes that ipywidgets is missing
    warnings.filterwarnings("ignore", message="IProgress not found")
    import transformers

    from benchmarks import hf_reference

FIGURES = pathlib.Path("figures")
FIGURES.mkdir(exist_ok=True)
work = pathlib.Path(tempfile.mkdtemp(prefix="convert-"))
transformers.utils.logging.disable_progress_bar()
absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's notes on how it merges its files

# %% [markdown]
# ## A stand-in for the release
#
# `dbrx-tiny` has every feature of the real model (GQA, `clip_qkv`, NeoX RoPE with theta 5e5,
# 16 experts top-4) at 0.7M parameters. Its `to_hf()` is the `config.json` transformers reads.
# Random weights at DBRX's initialisation scale give near-uniform logits, so `hf_model` draws
# them larger (its default `decisive=True`): then the clipping bites and the router's choices
# are decisive.

# %%
config = dbrx_jax.DbrxConfig.preset("dbrx-tiny")
reference = hf_reference.hf_model(config, seed=0)
hf_dir = work / "hf"
reference.save_pretrained(hf_dir)
for path in sorted(hf_dir.iterdir()):
    print(f"{path.name:32s} {path.stat().st_size:>10,d} bytes")

# %% [markdown]
# ## Convert
#
# `convert.hf_to_jax` (or `python experiments/convert.py --direction=hf_to_jax --input=...
# --output=...`) streams one tensor piece at a time from the safetensors shards into an Orbax
# export, reordering the fused QKV by KV head and stacking the layers; its memory stays flat
# however large the model.

# %%
ours_dir = work / "ours"
convert.hf_to_jax(str(hf_dir), str(ours_dir), progress=False)
model = dbrx_jax.from_pretrained(str(ours_dir))
print(json.dumps(model.config.architecture(), indent=1)[:400], "...")

# %% [markdown]
# ## Compare the logits
#
# The same batch through both models, in float32. Both differ from the exact (float64) result
# by float32 round-off, amplified by these deliberately large weights; the argmax and the
# routing agree everywhere.

# %%
tokens_BT = np.random.RandomState(0).randint(0, config.vocab_size, (4, 48))
hf_logits_BTV, hf_router_LBTE = hf_reference.run(reference, tokens_BT)
out = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens_BT))
logits_BTV = np.asarray(out.logits)
diff_BTV = np.abs(logits_BTV - hf_logits_BTV)
hf_experts_LBTA = np.argsort(-hf_router_LBTE, axis=-1)[..., : config.moe_top_k]
ours_experts_LBTA = np.asarray(out.router.expert_ids_LBTA)
with jax.enable_x64(True):  # the exact answer: our model in float64, same weights
    model64 = dbrx_jax.from_pretrained(str(ours_dir), dtype=jnp.float64)
    exact_BTV = np.asarray(model64(jnp.asarray(tokens_BT)).logits)
print(f"logit scale (std) {hf_logits_BTV.std():.2f}; max |difference|:")
print(f"  dbrx_jax float32 vs transformers float32  {diff_BTV.max():.1e}")
print(f"  dbrx_jax float32 vs float64               {np.abs(logits_BTV - exact_BTV).max():.1e}")
print(f"  transformers float32 vs float64           {np.abs(hf_logits_BTV - exact_BTV).max():.1e}")
print(
    "same top-4 experts for every token and layer:",
    bool((np.sort(hf_experts_LBTA, -1) == np.sort(ours_experts_LBTA, -1)).all()),
)
print("same next-token argmax:", bool((logits_BTV.argmax(-1) == hf_logits_BTV.argmax(-1)).all()))

# %%
fig, (ax_scatter, ax_hist) = plt.subplots(1, 2, figsize=(11, 3.8))
sample = np.random.RandomState(1).choice(diff_BTV.size, 20000, replace=False)
ax_scatter.scatter(hf_logits_BTV.ravel()[sample], logits_BTV.ravel()[sample], s=2, alpha=0.3)
ax_scatter.set_xlabel("transformers logit")
ax_scatter.set_ylabel("dbrx_jax logit")
ax_scatter.set_title("every logit of a 4 x 48 batch (20k shown)")
ax_hist.hist(np.log10(np.maximum(diff_BTV.ravel(), 1e-9)), bins=60)
ax_hist.set_xlabel("log10 |dbrx_jax - transformers| (exact zeros at -9)")
ax_hist.set_ylabel("logits")
ax_hist.set_title("the differences: float32 round-off")
fig.tight_layout()
fig.savefig(FIGURES / "03_convert_and_compare.png", dpi=120)
plt.show()

# %% [markdown]
# ## Generate from both
#
# Greedy decoding with transformers' `generate` and with our KV-cache `generate` (a jitted
# prefill, then a `lax.while_loop` of one-token steps).

# %%
prompts = [[5, 17, 300, 42], [101, 7, 250, 99, 3, 60, 8, 11]]
new_tokens = 16
ours = generate(model, prompts, max_new_tokens=new_tokens)
ours_tokens_BX = np.asarray(ours.tokens_BX)
reference.generation_config.eos_token_id = None  # random weights: run the full length
for i, prompt in enumerate(prompts):
    with torch.no_grad():
        hf_tokens_X = reference.generate(
            torch.as_tensor([prompt]), max_new_tokens=new_tokens, do_sample=False
        )[0, len(prompt) :].numpy()
    print(f"prompt {prompt}")
    print(f"  transformers {hf_tokens_X.tolist()}")
    same = bool((hf_tokens_X == ours_tokens_BX[i]).all())
    print(f"  dbrx_jax     {ours_tokens_BX[i].tolist()}  same: {same}")

# %% [markdown]
# ## Back to Hugging Face
#
# `convert.jax_to_hf` writes safetensors shards and a `config.json` transformers loads. Every
# tensor comes back bit for bit, and transformers runs the exported model to the same logits.

# %%
back_dir = work / "back"
convert.jax_to_hf(str(ours_dir), str(back_dir), progress=False)


def tensors(directory):
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(safetensors.numpy.load_file(shard))
    return out


original, returned = tensors(hf_dir), tensors(back_dir)
assert original.keys() == returned.keys()
equal = [name for name in original if np.array_equal(original[name], returned[name])]
print(f"{len(equal)} of {len(original)} tensors bitwise equal after HF -> dbrx_jax -> HF")
reloaded = transformers.DbrxForCausalLM.from_pretrained(back_dir).eval()
again_BTV, _ = hf_reference.run(reloaded, tokens_BT)
print(
    "transformers on the exported model, max |difference|:",
    float(np.abs(again_BTV - hf_logits_BTV).max()),
)
