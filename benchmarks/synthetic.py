"""Synthetic inputs of the benchmarks (and of tests that want the same ones): router choices of a
given balance, a DBRX checkpoint in the Hugging Face format with random bits, and a random model
exported to the HF format."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from flax import nnx

from dbrx_jax import DbrxConfig
from dbrx_jax.io.checkpoint import export_params
from dbrx_jax.io.convert import jax_to_hf, pieces
from dbrx_jax.io.hf_format import TENSOR_MAPS
from dbrx_jax.io.safetensors import SafetensorsWriter
from dbrx_jax.model import Dbrx
from dbrx_jax.tokenizer import DBRX_VOCAB_SIZE


def routing(
    kind: str, tokens: int, experts: int, top_k: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Expert ids `[M, A]` (distinct per token) and renormalised weights `[M, A]` of M = `tokens`
    tokens with A = `top_k` slots each.

    balanced: every expert gets exactly M * A / E assignments (round robin).
    skewed: experts drawn with Zipf-like popularity p_e ~ 1 / (e + 1): the first two experts
      take about a third of all assignments, the way an unbalanced router behaves early on.
    """
    rng = np.random.RandomState(seed)
    if kind == "balanced":
        ids_MA = (np.arange(tokens)[:, None] * top_k + np.arange(top_k)) % experts
    elif kind == "skewed":
        log_p_E = -np.log(np.arange(1, experts + 1))
        gumbel_ME = rng.gumbel(size=(tokens, experts))
        ids_MA = np.argsort(-(log_p_E + gumbel_ME), axis=1)[:, :top_k]  # without replacement
    else:
        raise ValueError(f"routing {kind!r}: expected 'balanced' or 'skewed'")
    weights_MA = rng.dirichlet(np.ones(top_k), size=tokens)
    return ids_MA.astype(np.int32), weights_MA.astype(np.float32)


def synthetic_hf_checkpoint(
    directory: str, config: DbrxConfig, *, seed: int = 0, shard_bytes: int = 5 * 10**9
) -> int:
    """A DBRX checkpoint with the real tensor names and shapes and random bf16 bits, in files of
    at most `shard_bytes` (or one tensor), written piece by piece (never a whole model in
    memory). Returns its size in bytes."""
    os.makedirs(directory, exist_ok=True)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(seed)
    order = [(row, None) for row in TENSOR_MAPS if not row.per_layer]
    order += [(row, i) for i in range(config.n_layers) for row in TENSOR_MAPS if row.per_layer]
    shards, size = [[]], 0
    for row, layer in order:
        nbytes = int(np.prod(row.hf_shape(config))) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append((row, layer))
        size += nbytes
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(
            os.path.join(directory, name),
            [(r.hf_name.format(i=i), bf16, r.hf_shape(config)) for r, i in shard],
        )
        for row, layer in shard:
            tensor = row.hf_name.format(i=layer)
            weight_map[tensor] = name
            shape = row.hf_shape(config)
            n_pieces = len(pieces(row, config))
            for _ in range(n_pieces):
                bits = rng.integers(0, 2**16, (shape[0] // n_pieces, *shape[1:]), dtype=np.uint16)
                writer.write(tensor, bits.view(bf16))
                total += bits.nbytes
        writer.close()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return total


def random_hf_model(directory: str, config: DbrxConfig, *, seed: int = 0) -> str:
    """A randomly initialised model of `config`, exported (`directory/export`) and converted to
    the HF format (`directory/hf`, returned), tokenizer files included for DBRX's vocabulary.
    LM-head columns past the tokenizer's ids are zero, as nothing ever predicts them in the
    release, so that no backend's greedy choice lands on a padding row."""
    model = Dbrx(config, rngs=nnx.Rngs(seed))
    if config.vocab_size > DBRX_VOCAB_SIZE:
        model.lm_head[...] = model.lm_head[...].at[:, DBRX_VOCAB_SIZE:].set(0)
    export, hf = os.path.join(directory, "export"), os.path.join(directory, "hf")
    export_params(nnx.state(model, nnx.Param), config, export)
    jax_to_hf(export, hf, progress=False)
    return hf
