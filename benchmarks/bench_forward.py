"""Forward pass against transformers, in one process on the same weights: our jitted forward
(logits of every position) and `DbrxForCausalLM` in eager PyTorch (sdpa attention, the expert
loop), timed alternately so that both see the same machine, with the largest logit difference.
CPU only (transformers runs on the CPU here).

    python -m benchmarks.bench_forward                                   # dbrx-small, 4 x 256
    python -m benchmarks.bench_forward --config.batch_size=1 --config.seq_len=128
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from benchmarks import cli, hf_reference, timing
from dbrx_jax import Dbrx
from dbrx_jax.io.pretrained import hf_state_dict

_CONFIG = config_flags.DEFINE_config_file(
    "config", cli.BENCH_CONFIG, "Benchmark config: model, batch_size, seq_len."
)
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls of each (median).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report here.")


def forward_report(config, batch_size: int, seq_len: int, iters: int) -> dict:
    model = Dbrx(config, rngs=nnx.Rngs(0))
    hf = hf_reference.hf_model(config, dtype=config.dtype, decisive=False)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(model).items()}
    hf.load_state_dict(weights, strict=True)
    tokens = timing.random_tokens(config.vocab_size, (batch_size, seq_len))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens).logits)
    tokens_jax, tokens_torch = jnp.asarray(tokens), torch.from_numpy(tokens).long()

    def ours():
        return jax.block_until_ready(forward(state, tokens_jax))

    def theirs():
        with torch.no_grad():
            return hf(tokens_torch).logits

    start = time.perf_counter()
    ours_logits = np.asarray(ours())
    compile_s = time.perf_counter() - start
    hf_logits = theirs().numpy()
    seconds = {"ours": [], "hf": []}
    for _ in range(iters):  # alternately: both see the same machine
        for name, fn in (("ours", ours), ("hf", theirs)):
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    ours_s, hf_s = (float(np.median(seconds[k])) for k in ("ours", "hf"))
    return {
        "device": jax.devices()[0].platform,
        "batch": batch_size,
        "seq_len": seq_len,
        "ours_ms": ours_s * 1e3,
        "hf_ms": hf_s * 1e3,
        "speedup": hf_s / ours_s,
        "compile_s": compile_s,
        "max_abs_logit_diff": float(np.abs(ours_logits - hf_logits).max()),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    report = forward_report(
        cli.model_config(config), config.batch_size, config.seq_len, _ITERS.value
    )
    report["preset"] = config.model.preset
    cli.write_report(report, _JSON_OUT.value)


if __name__ == "__main__":
    app.run(main)
