"""Training as library code: the loss over packed sequences, the jitted train and eval steps over
the mesh, and the loop `train(config, workdir)` that experiments/train.py and notebooks call.

A batch is a dict of `[B, T]` arrays (data.model_batch makes them):
  inputs       token ids fed to the model
  targets      the next token of each input
  segment_ids  document of each token in a packed row (0: padding)
  positions    RoPE position of each token within its document
  loss_mask    1.0 where the target is a real next token of the same document, else 0.0
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dbrx_jax import data, experiment, flops, metrics, sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx
from dbrx_jax.moe import load_balancing_loss, moe_aux_loss, moe_stats, router_z_loss
from dbrx_jax.optim import learning_rate_schedule, make_optimizer
from dbrx_jax.tokenizer import load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)


def loss_fn(
    model: Dbrx,
    batch: Mapping[str, jax.Array],
    jitter_key: jax.Array | None = None,
    *,
    num_targets: jax.Array | None = None,
    aux_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective: next-token cross-entropy (fp32) summed over the masked targets and divided
    by `num_targets` (default: this batch's count), plus `aux_scale` x the MoE auxiliary losses.
    Gradient accumulation passes the whole batch's count and 1 / micro-batches."""
    config: DbrxConfig = model.config
    out = model(
        batch["inputs"],
        segment_ids_BT=batch["segment_ids"],
        positions_BT=batch["positions"],
        jitter_key=jitter_key,
    )
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(
        out.logits.astype(jnp.float32),
        batch["targets"],  # the softmax in fp32
    )
    mask_BT = batch["loss_mask"]
    ce_sum = jnp.sum(ce_BT * mask_BT)
    count = mask_BT.sum()
    num_targets = jnp.maximum(count, 1.0) if num_targets is None else num_targets
    token_mask_BT = batch["segment_ids"] != 0
    aux = moe_aux_loss(out.router, config, token_mask_BT)
    stats = moe_stats(out.router, config.moe_num_experts, token_mask_BT)
    load_LE = stats.tokens_per_expert_LE / jnp.maximum(
        stats.tokens_per_expert_LE.sum(-1, keepdims=True), 1.0
    )
    aux_metrics = {
        "ce_sum": ce_sum,
        "targets": count,
        "aux_loss": aux,
        "load_balancing": load_balancing_loss(out.router, config.moe_num_experts, token_mask_BT),
        "router_z": router_z_loss(out.router, token_mask_BT),
        "expert_load_max": load_LE.max(-1),  # per layer: the busiest expert's share
        "expert_load_min": load_LE.min(-1),
        "router_entropy": stats.router_entropy_L,
        "dropped_fraction": stats.dropped_fraction_L,
    }
    return ce_sum / num_targets + aux_scale * aux, aux_metrics


def _summarise(micro: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Micro-batch metrics (leading axis) -> the step's."""
    targets = jnp.maximum(micro["targets"].sum(), 1.0)
    ce = micro["ce_sum"].sum() / targets
    out = {k: v.mean(0) for k, v in micro.items() if k not in ("ce_sum", "targets")}
    out.update(ce=ce, perplexity=jnp.exp(ce), targets=targets, loss=ce + out["aux_loss"])
    return out


def _micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[count, B / count, ...]`, micro-batch i = rows i, i + count, ... (so each
    keeps the batch's sharding over devices)."""
    return {
        k: v.reshape(v.shape[0] // count, count, *v.shape[1:]).swapaxes(0, 1)
        for k, v in batch.items()
    }


def accumulate_gradients(graphdef, params, batch, key, grad_accum_steps: int = 1):
    """Gradients of the objective over the batch as `grad_accum_steps` micro-batches summed in a
    scan, and the step's metrics. The cross-entropy part equals a single pass over the whole
    batch; the MoE losses are averaged over micro-batches (as MegaBlocks' are per micro-batch)."""
    micro = _micro_batches(batch, grad_accum_steps)
    num_targets = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    keys = None if key is None else jax.random.split(key, grad_accum_steps)

    def accumulate(grads, xs):
        micro_batch, micro_key = xs

        def objective(params):
            return loss_fn(
                nnx.merge(graphdef, params),
                micro_batch,
                micro_key,
                num_targets=num_targets,
                aux_scale=1.0 / grad_accum_steps,
            )

        g, micro_metrics = jax.grad(objective, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, g), micro_metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, micro_metrics = jax.lax.scan(accumulate, zeros, (micro, keys))
    return grads, _summarise(micro_metrics)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh, grad_accum_steps: int = 1):
    """`step(params, opt_state, batch, key) -> (params, opt_state, metrics)`, jitted over the
    mesh with the old parameters and optimizer state donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, key):
        grads, step_metrics = accumulate_gradients(graphdef, params, batch, key, grad_accum_steps)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        step_metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, step_metrics

    def run(params, opt_state, batch, key):
        with jax.set_mesh(mesh):
            return step(params, opt_state, batch, key)

    return run


def make_eval_step(graphdef, mesh):
    """`eval(params, batch) -> (cross-entropy sum, target count)`."""

    @jax.jit
    def evaluate(params, batch):
        _, m = loss_fn(nnx.merge(graphdef, params), batch)
        return m["ce_sum"], m["targets"]

    def run(params, batch):
        with jax.set_mesh(mesh):
            return evaluate(params, batch)

    return run


def init_train_state(config: DbrxConfig, tx: optax.GradientTransformation, mesh, seed: int = 0):
    """(graphdef, params, opt_state), each array created directly in its sharded layout."""
    model = sharding.shard_module(lambda: Dbrx(config, rngs=nnx.Rngs(seed)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_shardings = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state


def prepare_tokenizer(data_config: ml_collections.ConfigDict, documents, workdir: str) -> str:
    """The tokenizer spec for `data.tokenizer`; "spm" trains a sentencepiece model on the
    training split once and caches it in the workdir (process 0 trains, the rest wait)."""
    if data_config.tokenizer != "spm":
        return data_config.tokenizer
    path = os.path.join(workdir, f"spm_{data_config.spm_vocab_size}.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        train_split = data.split_indices(len(documents), data_config.eval_fraction, "train")
        train_sentencepiece((documents[i] for i in train_split), path, data_config.spm_vocab_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")
    return path


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per `config` (see experiment.base_config) in `workdir`; returns a summary."""
    experiment.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    documents = data.load_documents(config.data.source, config.data.text_key)
    tokenizer_spec = prepare_tokenizer(config.data, documents, workdir)
    tokenizer = load_tokenizer(tokenizer_spec)
    model_config = experiment.model_config(config.model, tokenizer.vocab_size)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(
                {
                    "experiment": config.to_dict(),
                    "model": json.loads(model_config.to_json()),
                    "tokenizer": tokenizer_spec,
                },
                f,
                indent=2,
                default=str,
            )
    n_proc, proc = jax.process_count(), jax.process_index()
    if config.batch_size % n_proc:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not a multiple of the {n_proc} processes"
        )
    datasets = {
        split: functools.partial(
            data.make_dataset,
            documents,
            tokenizer_spec,
            seq_len=config.seq_len,
            batch_size=config.batch_size // n_proc,
            seed=config.seed,
            split=split,
            eval_fraction=config.data.eval_fraction,
            process_index=proc,
            process_count=n_proc,
            packing_bins=config.data.packing_bins or None,
            worker_count=config.data.worker_count,
        )
        for split in ("train", "eval")
    }
    tx = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    graphdef, params, opt_state = init_train_state(model_config, tx, mesh, config.seed)
    train_step = make_train_step(graphdef, tx, mesh, config.grad_accum_steps)
    eval_step = make_eval_step(graphdef, mesh)
    log.info(
        "model %s: %.1fM parameters, %.1fM active; mesh %s",
        config.model.preset,
        model_config.num_params() / 1e6,
        model_config.num_active_params() / 1e6,
        dict(mesh.shape),
    )

    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = flops.train_flops_per_token(model_config, config.seq_len) * tokens_per_step
    peak = metrics.peak_flops()
    writer = metrics.MetricsWriter(workdir, config.total_steps)
    jitter = model_config.moe_jitter_eps
    base_key = jax.random.key(config.seed)
    history: list[tuple[int, float]] = []
    eval_history: list[tuple[int, float]] = []
    train_iter = iter(datasets["train"]())
    start = last_log = time.perf_counter()
    last_logged_step = 0
    try:
        for step in range(config.total_steps):
            batch = sharding.shard_batch(next(train_iter), mesh)
            key = jax.random.fold_in(base_key, step) if jitter else None
            params, opt_state, step_metrics = train_step(params, opt_state, batch, key)
            done = step + 1
            if done == 1 or done % config.log_every_steps == 0 or done == config.total_steps:
                step_metrics = jax.device_get(step_metrics)
                now = time.perf_counter()
                seconds = (now - last_log) / (done - last_logged_step)  # step 1: compile too
                last_log, last_logged_step = now, done
                step_metrics.update(
                    learning_rate=float(schedule(step)),
                    step_time=seconds,
                    tokens_per_s=tokens_per_step / seconds,
                    mfu=flops_per_step / seconds / (peak * jax.device_count()) if peak else None,
                )
                history.append((done, float(step_metrics["loss"])))
                writer.write(done, {k: v for k, v in step_metrics.items() if v is not None})
            if config.eval_every_steps and (
                done % config.eval_every_steps == 0 or done == config.total_steps
            ):
                eval_loss = evaluate(
                    eval_step, params, datasets["eval"](), mesh, config.eval_batches
                )
                eval_history.append((done, eval_loss))
                writer.write(
                    done, {"loss": eval_loss, "perplexity": np.exp(eval_loss)}, prefix="eval_"
                )
            writer.advance(done)
    finally:
        writer.close()
        del train_iter
    summary = {
        "steps": config.total_steps,
        "first_loss": history[0][1] if history else float("nan"),
        "last_loss": history[-1][1] if history else float("nan"),
        "eval_loss": eval_history[-1][1] if eval_history else float("nan"),
        "wall_s": time.perf_counter() - start,
        "loss_curve": history,
    }
    return summary


def evaluate(eval_step, params, eval_dataset, mesh, max_batches: int) -> float:
    """Mean next-token cross-entropy over the first `max_batches` held-out batches."""
    ce_sum = count = 0.0
    for i, batch in enumerate(eval_dataset):
        if i == max_batches:
            break
        s, n = eval_step(params, sharding.shard_batch(batch, mesh))
        ce_sum, count = ce_sum + float(s), count + float(n)
    return ce_sum / max(count, 1.0)
