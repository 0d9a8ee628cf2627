"""Parameter and FLOP counts, by MaxText's convention (used for MFU everywhere in the repo).

Training FLOPs per token = 6 * active matmul parameters (lm_head included, the embedding lookup
excluded) + 6 * L * d_model * S for causal attention (12 * L * d * S, halved by the mask).
"""

from __future__ import annotations

from dbrx_jax.config import DbrxConfig


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


def forward_flops_per_token(c: DbrxConfig, seq_len: int) -> int:
    return train_flops_per_token(c, seq_len) // 3


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
