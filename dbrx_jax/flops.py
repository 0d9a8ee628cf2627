"""Parameter and FLOP counts by MaxText's convention, and the devices' peaks (for MFU and the
decode roofline everywhere in the repo).

Training FLOPs per token = 6 * active matmul parameters (lm_head included, the embedding lookup
excluded) + 6 * L * d_model * S for causal attention (12 * L * d * S, halved by the mask).
"""

from __future__ import annotations

import jax

from dbrx_jax.aot.topology import CHIPS
from dbrx_jax.config import DbrxConfig

# Dense bf16 peak FLOP/s and HBM bytes/s per chip, for MFU and the decode roofline (vendor
# figures; sparse FLOP/s are twice these). TPUs come from the chip table of aot/topology.py,
# under the device kind jax reports ("TPU v5 lite" before "TPU v5": the lookup takes the first
# name the kind contains) and the generation's own name.
_TPUS = [
    (name, chip) for chip in CHIPS.values() for name in (chip.device_kind, f"TPU {chip.generation}")
]
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    **{name: chip.peak_flops for name, chip in _TPUS},
}
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    **{name: chip.hbm_bandwidth for name, chip in _TPUS},
}


def peak_flops(device_kind: str | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device of this kind; None where unknown (CPUs)."""
    return _lookup(PEAK_FLOPS, device_kind)


def peak_bandwidth(device_kind: str | None = None) -> float | None:
    """HBM bytes/s of one device of this kind; None where unknown."""
    return _lookup(PEAK_BANDWIDTH, device_kind)


def _lookup(table: dict[str, float], device_kind: str | None) -> float | None:
    kind = device_kind or jax.devices()[0].device_kind
    for name, value in table.items():
        if name.lower() in kind.lower():
            return value
    return None


def describe(config: DbrxConfig, seq_len: int) -> dict[str, int]:
    """The counts one asks of a config first."""
    return {
        "params": config.num_params(),
        "active_params": config.num_active_params(),
        "active_matmul_params": active_matmul_params(config),
        "train_flops_per_token": train_flops_per_token(config, seq_len),
    }


def active_matmul_params(c: DbrxConfig) -> int:
    """Matmul parameters one token passes through: attention, router, top_k experts, lm_head."""
    attention = c.d_model * (c.d_model + 2 * c.kv_n_heads * c.head_dim) + c.d_model * c.d_model
    router = c.d_model * c.moe_num_experts
    experts = c.moe_top_k * 3 * c.d_model * c.ffn_hidden_size
    return c.n_layers * (attention + router + experts) + c.d_model * c.vocab_size


def attention_flops_per_token(c: DbrxConfig, seq_len: int) -> int:
    """Forward + backward score and value matmuls of causal attention, per token."""
    return 6 * c.n_layers * c.d_model * seq_len


def train_flops_per_token(c: DbrxConfig, seq_len: int) -> int:
    return 6 * active_matmul_params(c) + attention_flops_per_token(c, seq_len)


def decode_bytes_per_step(c: DbrxConfig, batch: int, context: int, bytes_per_param: int = 2) -> int:
    """Bytes a decode step must read: every non-expert weight, the experts the batch's tokens
    can touch (at most all E), one embedding row per token, and the KV cache so far."""
    d, e, f = c.d_model, c.moe_num_experts, c.ffn_hidden_size
    attention = d * (d + 2 * c.kv_n_heads * c.head_dim) + d * d + 2 * d
    experts_touched = min(e, batch * c.moe_top_k)
    per_layer = attention + d * e + experts_touched * 3 * d * f
    weights = c.n_layers * per_layer + d * c.vocab_size + d + batch * d
    kv_cache = 2 * c.n_layers * batch * context * c.kv_n_heads * c.head_dim
    return (weights + kv_cache) * bytes_per_param
