"""dbrx_jax: Databricks' DBRX mixture-of-experts LLM in JAX / Flax NNX.

The package, bottom up (a module imports only from rows above it):

    config.py      DbrxConfig: HF field names, our knobs, presets, dtype names
    io/hf_format   the Hugging Face format: config.json, tensor names and layouts
    io/safetensors reading and writing safetensors files without torch
    nn.py          parameters with logical axes, precision and remat helpers
    quant.py       int8 / 4-bit weight quantization of a frozen base (QLoRA; qwix)
    lora.py        low-rank adapters on any weight, the experts' included
    sharding.py    the mesh, logical-axis rules, sharded init and batches, multi-host
    moe/           router and losses, the execution plan, dispatch, grouped GEMMs, exchange
    model/         attention and norms, the block, the Dbrx model and its KV cache
    io/            Orbax checkpoints, from_pretrained, the streaming converter
    memory.py, flops.py   per-device memory and FLOP counts from shapes
    sft.py         chat conversations, the KJV quotation set and its scoring
    data.py, tokenizer.py, chat.py   documents to batches; tokenizers; the chat format
    optim.py, state.py, train.py, metrics.py, experiment.py   training
    generate.py    KV-cache generation and sampling
    aot/           compiling those programs for a TPU slice on any host: slices, reports
                   (aot/topology.py, the TPU chip table, imports nothing of ours: flops.py
                   reads its figures)
    cli.py         how entry points fail (one line) and stop (SIGTERM)

The shape legend every module uses is in dbrx_jax/model/__init__.py.
"""

from dbrx_jax.config import PRESETS, DbrxConfig
from dbrx_jax.io.pretrained import from_pretrained
from dbrx_jax.model import Dbrx, DbrxOutput, KVCache
from dbrx_jax.moe import (
    MoEOutput,
    MoEPlan,
    MoEStats,
    RouterOutput,
    Routing,
    load_balancing_loss,
    moe_aux_loss,
    moe_stats,
    plan_moe,
    router_z_loss,
)
from dbrx_jax.state import load_adapted

__all__ = [
    "PRESETS",
    "Dbrx",
    "DbrxConfig",
    "DbrxOutput",
    "KVCache",
    "MoEOutput",
    "MoEPlan",
    "MoEStats",
    "RouterOutput",
    "Routing",
    "from_pretrained",
    "load_adapted",
    "load_balancing_loss",
    "moe_aux_loss",
    "moe_stats",
    "plan_moe",
    "router_z_loss",
]
