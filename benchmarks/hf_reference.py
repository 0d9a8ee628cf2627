"""transformers' `DbrxForCausalLM` built from a `DbrxConfig`: the PyTorch reference our tests
match, our notebooks compare with and our benchmarks time. The one place that builds it.

Needs the `test` extras (torch, transformers); the library never imports this module.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from dbrx_jax import DbrxConfig


def hf_model(
    config: DbrxConfig,
    seed: int = 0,
    *,
    attn: str = "sdpa",
    dtype: str = "float32",
    device: str = "cpu",
    decisive: bool = True,
) -> transformers.DbrxForCausalLM:
    """A random transformers DBRX of `config` (its `to_hf()` dict), in eval mode.

    decisive: draw the weights larger than DBRX's initialisation so that `clip_qkv` really clips
    and the router's choices are decisive and vary from token to token (what a parity test
    needs); False keeps transformers' own initialisation (what a timing needs)."""
    hf_config = transformers.DbrxConfig(**config.to_hf())
    hf_config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.DbrxForCausalLM(hf_config).eval()
    if decisive:
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
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return without_clip_crash(model)


def without_clip_crash(model: transformers.DbrxForCausalLM) -> transformers.DbrxForCausalLM:
    """transformers 5.x calls `clamp(min=None, max=None)` when clip_qkv is None, which torch
    rejects; clamping at +-inf is the same no-op, so the reference's path stays unchanged."""
    for block in model.transformer.blocks:
        if block.norm_attn_norm.attn.clip_qkv is None:
            block.norm_attn_norm.attn.clip_qkv = float("inf")
    return model


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
