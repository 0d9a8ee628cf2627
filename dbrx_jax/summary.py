"""What one asks of a config first: how big, how many FLOPs, how long to compile and run."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbrx_jax import flops
from dbrx_jax.bench import time_call
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx


def describe(config: DbrxConfig, seq_len: int) -> dict[str, float]:
    return {
        "params": config.num_params(),
        "active_params": config.num_active_params(),
        "active_matmul_params": flops.active_matmul_params(config),
        "train_flops_per_token": flops.train_flops_per_token(config, seq_len),
    }


def time_forward(
    model: Dbrx, batch_size: int, seq_len: int, *, iters: int = 5, seed: int = 0
) -> dict[str, float]:
    """Seconds to lower, compile and run one jitted forward over random tokens."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens_BT):
        return nnx.merge(graphdef, state)(tokens_BT).logits

    tokens = jnp.asarray(
        np.random.RandomState(seed).randint(0, model.config.vocab_size, (batch_size, seq_len)),
        jnp.int32,
    )
    start = time.perf_counter()
    lowered = forward.lower(state, tokens)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    step = time_call(compiled, state, tokens, iters=iters)
    return {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "step_s": step,
        "tokens_per_s": batch_size * seq_len / step,
    }
