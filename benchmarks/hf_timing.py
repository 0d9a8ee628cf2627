"""transformers' side of the comparisons: its training step and its `generate` timed on the
config ours are timed on (`hf_reference.hf_model` with transformers' own initialisation, in the
config's compute dtype, on the GPU if there is one).

Needs the `test` extras (torch, transformers). The benchmarks run it in its own process
(`cli.run_worker`), so that PyTorch never shares an accelerator with JAX.
"""

from __future__ import annotations

import torch

from benchmarks import hf_reference
from benchmarks.timing import time_call
from dbrx_jax import DbrxConfig


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def hf_train_step_benchmark(
    config: DbrxConfig, batch_size: int, seq_len: int, *, iters: int = 5
) -> dict[str, float | str | None]:
    """Tokens/s of transformers' DbrxForCausalLM training step (forward with the load-balancing
    loss, backward, AdamW) on random tokens."""
    device = _device()
    model = hf_reference.hf_model(config, dtype=config.dtype, device=device, decisive=False)
    model.train()  # a training step (no dropout in DBRX; the router's jitter where configured)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    tokens_BT = torch.randint(0, config.vocab_size, (batch_size, seq_len), device=device)

    def step():
        loss = model(tokens_BT, labels=tokens_BT, output_router_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    step_s = time_call(step, iters=iters)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {
        "step_s": step_s,
        "tokens_per_s": batch_size * seq_len / step_s,
        "peak_memory_gb": peak_gb,
        "device": device,
    }


def hf_generate_benchmark(
    config: DbrxConfig, batch: int, prompt_len: int, new_tokens: int, *, iters: int = 3
) -> dict[str, float | str]:
    """Prefill and decode tokens/s of transformers' `generate` (greedy, KV cache), measured as
    `timing.generate_benchmark` measures ours."""
    device = _device()
    model = hf_reference.hf_model(config, dtype=config.dtype, device=device, decisive=False)
    prompts_BT = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)

    def run(n):
        with torch.no_grad():
            model.generate(
                prompts_BT, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        _synchronize(device)

    prefill_s = time_call(run, 1, iters=iters)
    decode_s = max(time_call(run, new_tokens, iters=iters) - prefill_s, 1e-9)
    return {
        "batch": batch,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "device": device,
    }
