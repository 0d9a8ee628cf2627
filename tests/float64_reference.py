"""transformers' DBRX in float64, for the exactness checks (the model itself comes from
benchmarks/hf_reference.py, the one place that builds it)."""

from __future__ import annotations

import torch
import transformers

from benchmarks.hf_reference import without_clip_crash
from dbrx_jax import DbrxConfig


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
    return without_clip_crash(model64)
