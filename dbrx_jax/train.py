"""The training step as library code: the loss over packed sequences, sharded initialisation of
parameters and optimizer state, and a jitted, donated update over the mesh.

A batch is a dict of `[B, T]` arrays (what the data pipeline produces):
  inputs       token ids fed to the model
  targets      the next token of each input
  segment_ids  document of each token in a packed row (0: padding)
  positions    RoPE position of each token within its document
  loss_mask    1.0 where the target is a real next token of the same document, else 0.0
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dbrx_jax import sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx, positions_from_segments
from dbrx_jax.moe import load_balancing_loss, moe_aux_loss, router_z_loss


def batch_from_tokens(tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> dict:
    """The batch dict for rows of T + 1 tokens (packed documents separated by segment ids)."""
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones_like(tokens_BT)
    segments = segment_ids_BT[:, :-1]
    same_doc = (segment_ids_BT[:, 1:] == segments) & (segments != 0)
    return {
        "inputs": tokens_BT[:, :-1],
        "targets": tokens_BT[:, 1:],
        "segment_ids": segments,
        "positions": positions_from_segments(segments),
        "loss_mask": same_doc.astype(jnp.float32),
    }


def loss_fn(
    model: Dbrx, batch: Mapping[str, jax.Array], jitter_key: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy (fp32) over the masked targets, plus the MoE auxiliary losses."""
    config: DbrxConfig = model.config
    out = model(
        batch["inputs"],
        segment_ids_BT=batch["segment_ids"],
        positions_BT=batch["positions"],
        jitter_key=jitter_key,
    )
    logits_BTV = out.logits.astype(jnp.float32)  # the softmax in fp32
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    mask_BT = batch["loss_mask"]
    n_targets = jnp.maximum(mask_BT.sum(), 1.0)
    ce = jnp.sum(ce_BT * mask_BT) / n_targets
    token_mask_BT = batch["segment_ids"] != 0
    aux = moe_aux_loss(out.router, config, token_mask_BT)
    metrics = {
        "loss": ce + aux,
        "ce": ce,
        "load_balancing": load_balancing_loss(out.router, config.moe_num_experts, token_mask_BT),
        "router_z": router_z_loss(out.router, token_mask_BT),
        "targets": n_targets,
    }
    return ce + aux, metrics


def init_train_state(config: DbrxConfig, tx: optax.GradientTransformation, mesh, seed: int = 0):
    """(graphdef, params, opt_state), each array created directly in its sharded layout."""
    model = sharding.shard_module(lambda: Dbrx(config, rngs=nnx.Rngs(seed)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.param_shardings(abstract_opt, mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh):
    """`step(params, opt_state, batch, key) -> (params, opt_state, metrics)`: jitted over the
    mesh, with the old parameters and optimizer state donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, key):
        def loss(params):
            return loss_fn(nnx.merge(graphdef, params), batch, jitter_key=key)

        grads, metrics = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics

    def run(params, opt_state, batch, key):
        with jax.set_mesh(mesh):
            return step(params, opt_state, batch, key)

    return run
