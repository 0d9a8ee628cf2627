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

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dbrx_jax import checkpoint as ckpt
from dbrx_jax import data, experiment, flops, metrics, sharding
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx
from dbrx_jax.moe import load_balancing_loss, moe_aux_loss, moe_stats, router_z_loss
from dbrx_jax.optim import learning_rate_schedule, make_optimizer
from dbrx_jax.tokenizer import load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

# Without a log or checkpoint step sooner, the loop reads the steps' `skipped` flags this often.
_READ_SKIPPED_EVERY = 100


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
    with jax.named_scope("lm_head"):
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
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            # A non-finite loss or gradient leaves the state as it was (the loop counts these).
            # A branch, not a select over every array: the update's pass is the only one.
            finite = jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(grad_norm)

            def update(state):
                params, opt_state = state
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            new_params, new_opt_state = jax.lax.cond(
                finite, update, lambda state: state, (params, opt_state)
            )
        step_metrics.update(grad_norm=grad_norm, skipped=~finite)
        return new_params, new_opt_state, step_metrics

    def run(params, opt_state, batch, key):
        with jax.set_mesh(mesh):
            return step(params, opt_state, batch, key)

    def lower(params, opt_state, batch, key):
        with jax.set_mesh(mesh):
            return step.lower(params, opt_state, batch, key)

    run.lower = lower  # ahead-of-time: benchmarks time and profile the compiled step
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


def abstract_train_state(config: DbrxConfig, tx: optax.GradientTransformation, mesh):
    """(graphdef, params, opt_state) as ShapeDtypeStructs carrying their shardings on `mesh`:
    the targets to restore a checkpoint into, whatever mesh it was saved from."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0))), nnx.Param)
    opt_state = jax.eval_shape(tx.init, params)

    def with_shardings(tree):
        def attach(leaf, sharding_):
            if isinstance(leaf, nnx.Variable):
                value = leaf.get_value()
                return leaf.replace(
                    jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding_)
                )
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_)

        return jax.tree.map(
            attach,
            tree,
            sharding.param_shardings(tree, mesh),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    return graphdef, with_shardings(params), with_shardings(opt_state)


def init_train_state(config: DbrxConfig, tx: optax.GradientTransformation, mesh, seed: int = 0):
    """(graphdef, params, opt_state), each array created directly in its sharded layout."""
    model = sharding.shard_module(lambda: Dbrx(config, rngs=nnx.Rngs(seed)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, init_opt_state(tx, params, mesh)


def init_opt_state(tx: optax.GradientTransformation, params, mesh):
    """A fresh optimizer state for `params`, each array created in its sharded layout."""
    opt_shardings = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
    with jax.set_mesh(mesh):
        return jax.jit(tx.init, out_shardings=opt_shardings)(params)


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


@dataclasses.dataclass
class _Setup:
    mesh: jax.sharding.Mesh
    model_config: DbrxConfig
    tokenizer_spec: str
    datasets: dict  # split -> () -> grain dataset
    tx: optax.GradientTransformation
    run_config: dict  # what a checkpoint records of the run


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Setup:
    experiment.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    documents = data.load_documents(config.data.source, config.data.text_key)
    tokenizer_spec = prepare_tokenizer(config.data, documents, workdir)
    model_config = experiment.model_config(config.model, load_tokenizer(tokenizer_spec).vocab_size)
    n_proc = jax.process_count()
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
            process_index=jax.process_index(),
            process_count=n_proc,
            packing_bins=config.data.packing_bins or None,
            worker_count=config.data.worker_count,
        )
        for split in ("train", "eval")
    }
    run_config = {
        "experiment": config.to_dict(),
        "model": json.loads(model_config.to_json()),
        "architecture": model_config.architecture(),
        "tokenizer": tokenizer_spec,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=2, default=str)
    return _Setup(
        mesh,
        model_config,
        tokenizer_spec,
        datasets,
        make_optimizer(config),
        json.loads(json.dumps(run_config, default=str)),
    )


def _initial_state(setup: _Setup, config, checkpointer, train_iter):
    """(first step, params, opt_state): the latest checkpoint's if there is one (checked to be
    the same model), else `init_from`'s parameters with a new optimizer, else a new model."""
    graphdef, abstract_params, abstract_opt = abstract_train_state(
        setup.model_config, setup.tx, setup.mesh
    )
    if checkpointer is not None and checkpointer.steps():
        for step in reversed(checkpointer.steps()):
            try:
                stored = checkpointer.stored_config(step)
            except Exception:  # unreadable: restore_latest will skip it too
                continue
            ckpt.check_same_model(stored, setup.model_config, checkpointer.directory)
            break
        abstract = {"params": abstract_params, "opt_state": abstract_opt}
        step, state = checkpointer.restore_latest(abstract, train_iter)
        if step is not None:
            log.info("resumed from %s/%d", checkpointer.directory, step)
            return graphdef, step, state["params"], state["opt_state"]
    if config.init_from:
        params = load_params(config.init_from, setup.model_config, abstract_params)
        return graphdef, 0, params, init_opt_state(setup.tx, params, setup.mesh)
    graphdef, params, opt_state = init_train_state(
        setup.model_config, setup.tx, setup.mesh, config.seed
    )
    return graphdef, 0, params, opt_state


def load_params(path: str, model_config: DbrxConfig, abstract_params):
    """Parameters from an export (checkpoint.export_params) or an HF directory, laid out as
    `abstract_params` says; the architecture must match the run's."""
    from dbrx_jax import hf

    if ckpt.is_export(path):
        ckpt.check_same_model(
            {"architecture": ckpt.load_export_config(path).architecture()}, model_config, path
        )
        return ckpt.restore_params(path, abstract_params)
    source = hf.from_pretrained(path, dtype=model_config.param_dtype)
    ckpt.check_same_model({"architecture": source.config.architecture()}, model_config, path)
    params = nnx.state(source, nnx.Param)
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract_params))


class _Preemption:
    """SIGTERM (or JAX's preemption notice, via the checkpointer) -> save at the next step
    boundary and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving at the next step boundary, then stopping")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> dict[str, float]:
    """Trains per `config` (see experiment.base_config) in `workdir`, resuming from its latest
    complete checkpoint; returns a summary (with `preempted` True if SIGTERM cut it short).
    `progress=False` leaves out the console progress bar (metrics still go to the workdir)."""
    setup = _setup(config, workdir)
    mesh, model_config = setup.mesh, setup.model_config
    checkpointer = (
        ckpt.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.keep_checkpoints,
            keep_best=config.keep_best_checkpoint,
        )
        if config.checkpoint_every_steps
        else None
    )
    train_iter = iter(setup.datasets["train"]())
    graphdef, start_step, params, opt_state = _initial_state(
        setup, config, checkpointer, train_iter
    )
    train_step = make_train_step(graphdef, setup.tx, mesh, config.grad_accum_steps)
    eval_step = make_eval_step(graphdef, mesh)
    schedule = learning_rate_schedule(config)
    log.info(
        "model %s: %.1fM parameters, %.1fM active; mesh %s; from step %d",
        config.model.preset,
        model_config.num_params() / 1e6,
        model_config.num_active_params() / 1e6,
        dict(mesh.shape),
        start_step,
    )

    tokens_per_step = config.batch_size * config.seq_len
    flops_per_step = flops.train_flops_per_token(model_config, config.seq_len) * tokens_per_step
    peak = metrics.peak_flops()
    writer = metrics.MetricsWriter(workdir, config.total_steps, console=progress)
    writer.advance(start_step)
    base_key = jax.random.key(config.seed)
    history: list[tuple[int, float]] = []
    eval_history: list[tuple[int, float]] = []
    nonfinite_run, preempted = 0, False
    pending_skipped: list[tuple[int, jax.Array]] = []
    start = last_log = time.perf_counter()
    last_logged_step = start_step

    def save(step, eval_loss=None):
        state = {"params": params, "opt_state": opt_state}
        checkpointer.save(
            step,
            state,
            train_iter,
            setup.run_config,
            {"eval_loss": eval_loss} if eval_loss is not None else None,
        )

    try:
        with _Preemption() as preemption:
            for step in range(start_step, config.total_steps):
                batch = sharding.shard_batch(next(train_iter), mesh)
                key = jax.random.fold_in(base_key, step) if model_config.moe_jitter_eps else None
                params, opt_state, step_metrics = train_step(params, opt_state, batch, key)
                done = step + 1
                pending_skipped.append((done, step_metrics["skipped"]))
                log_now = (
                    done == start_step + 1
                    or done % config.log_every_steps == 0
                    or done == config.total_steps
                )
                stop = preemption.requested or (
                    checkpointer is not None and checkpointer.reached_preemption(done)
                )
                save_now = checkpointer is not None and (
                    stop or done % config.checkpoint_every_steps == 0 or done == config.total_steps
                )
                skipped = False
                if log_now or save_now or len(pending_skipped) >= _READ_SKIPPED_EVERY:
                    # Steps are not waited on one by one (no host sync between logs): their
                    # `skipped` flags are read here, in order.
                    for flag_step, flag in jax.device_get(pending_skipped):
                        nonfinite_run = nonfinite_run + 1 if flag else 0
                        if nonfinite_run >= config.max_nonfinite_steps:
                            good = (
                                checkpointer.steps()[-1]
                                if checkpointer and checkpointer.steps()
                                else None
                            )
                            raise FloatingPointError(
                                f"the loss was not finite for {nonfinite_run} consecutive steps "
                                f"(up to step {flag_step}); those updates were skipped and the "
                                f"run stops. The last good checkpoint is step {good} in "
                                f"{workdir}/checkpoints."
                            )
                    skipped = nonfinite_run > 0
                    pending_skipped.clear()
                if log_now:
                    step_metrics = jax.device_get(step_metrics)
                    now = time.perf_counter()
                    seconds = (now - last_log) / (done - last_logged_step)  # 1st: compile too
                    last_log, last_logged_step = now, done
                    step_metrics.update(
                        learning_rate=float(schedule(step)),
                        step_time=seconds,
                        tokens_per_s=tokens_per_step / seconds,
                        mfu=flops_per_step / seconds / (peak * jax.device_count())
                        if peak
                        else None,
                    )
                    history.append((done, float(step_metrics["loss"])))
                    writer.write(done, {k: v for k, v in step_metrics.items() if v is not None})
                eval_loss = None
                if config.eval_every_steps and (
                    done % config.eval_every_steps == 0 or done == config.total_steps
                ):
                    eval_loss = evaluate(
                        eval_step, params, setup.datasets["eval"](), mesh, config.eval_batches
                    )
                    eval_history.append((done, eval_loss))
                    writer.write(
                        done, {"loss": eval_loss, "perplexity": np.exp(eval_loss)}, prefix="eval_"
                    )
                writer.advance(done)
                if save_now and not skipped:
                    save(done, eval_loss)
                if stop:
                    preempted = True
                    break
    finally:
        if checkpointer is not None:
            checkpointer.wait()  # pending asynchronous saves reach the disk before we return
            checkpointer.close()
        writer.close()
    samples = {}
    if config.sample_prompts and jax.process_index() == 0:
        samples = sample_text(
            nnx.merge(graphdef, params),
            setup.tokenizer_spec,
            mesh,
            config.sample_prompts.split("|"),
            config.sample_tokens,
        )
    return {
        "steps": last_logged_step,
        "first_loss": history[0][1] if history else float("nan"),
        "last_loss": history[-1][1] if history else float("nan"),
        "eval_loss": eval_history[-1][1] if eval_history else float("nan"),
        "wall_s": time.perf_counter() - start,
        "preempted": preempted,
        "samples": samples,
        "loss_curve": history,
    }


def sample_text(
    model: Dbrx, tokenizer_spec: str, mesh, prompts: list[str], max_new_tokens: int
) -> dict[str, str]:
    """Greedy continuations of `prompts`: how the model writes after training."""
    from dbrx_jax.generate import generate

    tokenizer = load_tokenizer(tokenizer_spec)
    with jax.set_mesh(mesh):
        out = generate(
            model,
            [tokenizer.encode(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            stop_ids=(tokenizer.eos_id,),
            vocab_limit=tokenizer.vocab_size,
            pad_id=tokenizer.pad_id,
        )
    tokens, lengths = jax.device_get((out.tokens_BN, out.lengths_B))
    return {
        p: tokenizer.decode(row[:n]) for p, row, n in zip(prompts, tokens, lengths, strict=True)
    }


def evaluate(eval_step, params, eval_dataset, mesh, max_batches: int) -> float:
    """Mean next-token cross-entropy over the first `max_batches` held-out batches."""
    ce_sum = count = 0.0
    for i, batch in enumerate(eval_dataset):
        if i == max_batches:
            break
        s, n = eval_step(params, sharding.shard_batch(batch, mesh))
        ce_sum, count = ce_sum + float(s), count + float(n)
    return ce_sum / max(count, 1.0)
