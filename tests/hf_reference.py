"""Tiny random transformers DBRX models: the reference our model must match.

The weights are drawn larger than DBRX's initialisation so that `clip_qkv` really clips and the
router's choices are decisive and vary from token to token.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from dbrx_jax import DbrxConfig


def hf_model(
    config: DbrxConfig, seed: int = 0, *, attn: str = "sdpa"
) -> transformers.DbrxForCausalLM:
    """A float32 transformers.DbrxForCausalLM built from our config's `to_hf()` dict."""
    hf_config = transformers.DbrxConfig(**config.to_hf())
    hf_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(hf_config).eval()
    d, f = config.d_model, config.ffn_hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "wte" in name:
                p.normal_(0.0, 1.0)
            elif "Wqkv" in name or "router" in name:
                p.normal_(0.0, 2.0 / np.sqrt(d))
            elif "w2" in name:
                p.normal_(0.0, 1.0 / np.sqrt(f))
            else:
                p.normal_(0.0, 1.0 / np.sqrt(d))
    return _without_clip_crash(model)


def _without_clip_crash(model):
    """transformers 5.x calls `clamp(min=None, max=None)` when clip_qkv is None, which torch
    rejects; clamping at +-inf is the same no-op, so the reference's path stays unchanged."""
    for block in model.transformer.blocks:
        if block.norm_attn_norm.attn.clip_qkv is None:
            block.norm_attn_norm.attn.clip_qkv = float("inf")
    return model


class Float64Rope(torch.nn.Module):
    """Stands in for the reference's rotary table in float64 runs.

    transformers computes RoPE's inverse frequencies and angles in float32 even in a float64
    model (as the released model does in every dtype), and float32 cos/sin differ by an ulp
    between torch and XLA; that alone would hide the 1e-9 check. With this table both sides do
    the same maths in float64; everything else is the unmodified reference.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.inv_freq = 1.0 / theta**exponent

    def forward(self, x, position_ids):
        angles = position_ids[..., None].to(torch.float64) * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def float64_copy(model: transformers.DbrxForCausalLM, config: DbrxConfig):
    """The same weights in float64, with the float64 rotary table and math (sdpa) attention:
    transformers' eager attention does its softmax in float32 whatever the model dtype."""
    hf_config = transformers.DbrxConfig(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    model64 = transformers.DbrxForCausalLM(hf_config).eval()
    model64.load_state_dict(model.state_dict())
    model64 = model64.double()
    model64.transformer.rotary_emb = Float64Rope(config.head_dim, config.rope_theta)
    return _without_clip_crash(model64)


def run(model, tokens_BT: np.ndarray, mask_BT: np.ndarray | None = None):
    """Logits `[B, T, V]` and the per-layer router logits `[L, B, T, E]` as numpy."""
    with torch.no_grad():
        out = model(
            torch.as_tensor(tokens_BT, dtype=torch.long),
            attention_mask=None if mask_BT is None else torch.as_tensor(mask_BT),
            output_router_logits=True,
        )
    B, T = tokens_BT.shape
    router = np.stack([_numpy(r).reshape(B, T, -1) for r in out.router_logits])
    return _numpy(out.logits), router


def _numpy(x: torch.Tensor) -> np.ndarray:
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
