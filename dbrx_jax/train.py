"""Training as library code: the loss over packed sequences, the jitted train and eval steps, and
the loop `train(config, workdir)` that experiments/train.py and notebooks call.

A batch is a dict of `[B, T]` arrays (data.model_batch makes them):
  inputs       token ids fed to the model
  targets      the next token of each input
  segment_ids  document of each token in a packed row (0: padding)
  positions    RoPE position of each token within its document
  loss_mask    1.0 where the target is a real next token of the same document, else 0.0

One step of the loop: the batch is sharded over the mesh (sharding.shard_batch), the jitted step
(`make_train_step`) runs the model built for that mesh (its MoE plan fixed at build,
moe/plan.py) forward and backward over `grad_accum_steps` micro-batches, and the optimizer
updates the donated state, unless the loss or gradient is not finite. The loop waits on the
device only to log, evaluate or save.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dbrx_jax import data, experiment, flops, sft, sharding
from dbrx_jax.generate import chat_replies, check_request, sample_text
from dbrx_jax.io import checkpoint
from dbrx_jax.metrics import MetricsWriter
from dbrx_jax.model import Dbrx
from dbrx_jax.moe import load_balancing_loss, moe_aux_loss, moe_stats, plan_moe, router_z_loss
from dbrx_jax.optim import learning_rate_schedule, make_optimizer
from dbrx_jax.state import CHECKPOINTS, RunConfig, initial_state
from dbrx_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Without a log or checkpoint step sooner, the loop reads the steps' `skipped` flags this often.
_READ_SKIPPED_EVERY = 100


# ---------------------------------------------------------------------------------------------
# The objective and the steps.


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
    config = model.config
    out = model(
        batch["inputs"],
        segment_ids_BT=batch["segment_ids"],
        positions_BT=batch["positions"],
        jitter_key=jitter_key,
        training=True,
    )
    with jax.named_scope("lm_head"):
        ce_BT = optax.softmax_cross_entropy_with_integer_labels(
            out.logits.astype(jnp.float32),  # the softmax in fp32
            batch["targets"],
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


def accumulate_gradients(graphdef, params, batch, key, grad_accum_steps: int = 1, frozen=()):
    """Gradients of the objective over the batch as `grad_accum_steps` micro-batches summed in a
    scan, and the step's metrics. The cross-entropy part equals a single pass over the whole
    batch; the MoE losses are averaged over micro-batches (as MegaBlocks' are per micro-batch).
    Only `params` are differentiated; `frozen` (state.split_trainable: a LoRA run's base) is
    an input like the batch."""
    micro = _micro_batches(batch, grad_accum_steps)
    num_targets = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    keys = None if key is None else jax.random.split(key, grad_accum_steps)

    def accumulate(grads, xs):
        micro_batch, micro_key = xs

        def objective(params):
            return loss_fn(
                nnx.merge(graphdef, params, *frozen),
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


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum_steps: int = 1):
    """`step(params, opt_state, batch, key, frozen=()) -> (params, opt_state, metrics)`, jitted,
    with the old parameters and optimizer state donated (`frozen`, a LoRA run's base, is read,
    never differentiated nor donated). The model (`graphdef`) carries its mesh; the step is a
    plain `jax.jit` function (`step.lower(...)` compiles it ahead of time)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, key, frozen=()):
        grads, step_metrics = accumulate_gradients(
            graphdef, params, batch, key, grad_accum_steps, frozen
        )
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

    return step


def make_eval_step(graphdef):
    """`eval(params, batch, frozen=()) -> (cross-entropy sum, target count)`, jitted."""

    @jax.jit
    def evaluate(params, batch, frozen=()):
        _, m = loss_fn(nnx.merge(graphdef, params, *frozen), batch)
        return m["ce_sum"], m["targets"]

    return evaluate


def evaluate(eval_step, params, eval_dataset, mesh, max_batches: int, frozen=()) -> float:
    """Mean next-token cross-entropy over the first `max_batches` held-out batches (an eval set
    without a batch is an error, not a loss of 0)."""
    ce_sum = count = 0.0
    batches = 0
    for batch in itertools.islice(eval_dataset, max_batches):
        s, n = eval_step(params, sharding.shard_batch(batch, mesh), frozen)
        ce_sum, count, batches = ce_sum + float(s), count + float(n), batches + 1
    if not batches:
        raise ValueError("the eval split yielded no batch: there is nothing to evaluate")
    return ce_sum / max(count, 1.0)


def check_eval_split(config: ml_collections.ConfigDict, make_eval_dataset: Callable) -> None:
    """When the run evaluates, its eval split must yield a batch: checked before the first step,
    rather than found at the first evaluation, perhaps after the last step."""
    if not config.eval_every_steps:
        return
    fix = (
        f"raise config.data.eval_fraction (now {config.data.eval_fraction}), give "
        "config.data.source more documents, lower config.batch_size or config.seq_len, or set "
        "config.eval_every_steps=0"
    )
    try:
        batch = next(iter(make_eval_dataset()), None)
    except ValueError as e:  # an empty split (data.make_dataset)
        raise ValueError(f"config.data.source={config.data.source!r}: {e}; {fix}") from e
    if batch is None:
        raise ValueError(
            f"the eval split of config.data.source={config.data.source!r} yields no full batch "
            f"({experiment.process_batch_size(config)} rows of {config.seq_len + 1} tokens per "
            f"process); {fix}"
        )


# ---------------------------------------------------------------------------------------------
# The loop.


def _due(done: int, every: int, total: int) -> bool:
    """Whether something done `every` steps (0: never) is due after step `done`; always at the
    end of the run."""
    return bool(every) and (done % every == 0 or done == total)


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


@dataclasses.dataclass
class _Run:
    """Everything one training run holds between steps."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    run_config: RunConfig
    datasets: dict[str, Callable]  # split -> () -> grain dataset
    train_iter: object
    checkpointer: checkpoint.Checkpointer | None
    graphdef: object
    params: object  # what trains (state.split_trainable)
    opt_state: object
    frozen: tuple  # what does not: a LoRA run's base, else ()
    first_step: int
    train_step: Callable
    eval_step: Callable
    writer: MetricsWriter
    schedule: optax.Schedule
    history: list = dataclasses.field(default_factory=list)
    eval_history: list = dataclasses.field(default_factory=list)
    pending_skipped: list = dataclasses.field(default_factory=list)
    nonfinite_run: int = 0
    last_log: tuple[int, float] = (0, 0.0)  # (step, time)
    metrics: dict | None = None  # the latest step's, on the device
    jitter_key: jax.Array | None = None  # the router jitter's base key (moe_jitter_eps > 0)

    # -- the pieces of one iteration ---------------------------------------------------------

    def step(self, step: int) -> None:
        """Runs training step `step` (0-based) without waiting for it."""
        batch = sharding.shard_batch(next(self.train_iter), self.mesh)
        key = None if self.jitter_key is None else jax.random.fold_in(self.jitter_key, step)
        self.params, self.opt_state, self.metrics = self.train_step(
            self.params, self.opt_state, batch, key, self.frozen
        )
        self.pending_skipped.append((step + 1, self.metrics["skipped"]))

    def read_skipped(self) -> None:
        """Reads the pending steps' `skipped` flags in order (the one wait on the device between
        logs); raises after `max_nonfinite_steps` non-finite steps in a row."""
        for flag_step, flag in jax.device_get(self.pending_skipped):
            self.nonfinite_run = self.nonfinite_run + 1 if flag else 0
            if self.nonfinite_run >= self.config.max_nonfinite_steps:
                steps = self.checkpointer.steps() if self.checkpointer else []
                raise FloatingPointError(
                    f"the loss was not finite for {self.nonfinite_run} consecutive steps (up to "
                    f"step {flag_step}); those updates were skipped and the run stops. The last "
                    f"good checkpoint is step {steps[-1] if steps else None} in "
                    f"{self.workdir}/{CHECKPOINTS}."
                )
        self.pending_skipped.clear()

    def log(self, done: int) -> None:
        metrics = jax.device_get(self.metrics)
        now = time.perf_counter()
        last_step, last_time = self.last_log
        seconds = (now - last_time) / (done - last_step)  # the first log includes compiling
        self.last_log = (done, now)
        tokens = self.config.batch_size * self.config.seq_len
        model_flops = flops.train_flops_per_token(self.run_config.model, self.config.seq_len)
        peak = flops.peak_flops()
        metrics.update(
            learning_rate=float(self.schedule(done - 1)),
            step_time=seconds,
            tokens_per_s=tokens / seconds,
            mfu=model_flops * tokens / seconds / (peak * jax.device_count()) if peak else None,
        )
        self.history.append((done, float(metrics["loss"])))
        self.writer.write(done, {k: v for k, v in metrics.items() if v is not None})

    def maybe_evaluate(self, done: int) -> float | None:
        """The eval loss when due. Evaluation comes before the save so the checkpoint carries
        its eval loss (what keep_best_checkpoint ranks by); if it fails, the state is saved
        first (without one), so a failed evaluation never costs the steps since the last save."""
        if not _due(done, self.config.eval_every_steps, self.config.total_steps):
            return None
        try:
            eval_loss = evaluate(
                self.eval_step,
                self.params,
                self.datasets["eval"](),
                self.mesh,
                self.config.eval_batches,
                self.frozen,
            )
        except Exception:
            if self.checkpointer is not None:
                log.error("evaluation after step %d failed; saving the state first", done)
                self.save(done, None)
            raise
        self.eval_history.append((done, eval_loss))
        self.writer.write(
            done, {"loss": eval_loss, "perplexity": np.exp(eval_loss)}, prefix="eval_"
        )
        return eval_loss

    def save(self, done: int, eval_loss: float | None) -> None:
        if self.nonfinite_run:  # the state did not move this step: keep the last good one
            return
        self.checkpointer.save(
            done,
            {"params": self.params, "opt_state": self.opt_state},
            self.train_iter,
            self.run_config.to_json_dict(),
            {"eval_loss": eval_loss} if eval_loss is not None else None,
        )

    # -- predicates ---------------------------------------------------------------------------

    def log_due(self, done: int) -> bool:
        c = self.config
        return done == self.first_step + 1 or _due(done, c.log_every_steps, c.total_steps)

    def save_due(self, done: int, stopping: bool) -> bool:
        c = self.config
        return self.checkpointer is not None and (
            stopping or _due(done, c.checkpoint_every_steps, c.total_steps)
        )

    def preemption_reached(self, done: int) -> bool:
        return self.checkpointer is not None and self.checkpointer.reached_preemption(done)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()  # pending asynchronous saves reach the disk first
            self.checkpointer.close()
        self.writer.close()


def _start_run(config: ml_collections.ConfigDict, workdir: str, progress: bool) -> _Run:
    """Validates the config, builds the mesh, data, tokenizer and optimizer, checks the eval
    split, and restores or creates the state (state.initial_state); then records the run's
    config (workdir/config.json)."""
    experiment.validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    documents = data.load_documents(config.data.source, config.data.text_key)
    tokenizer_spec = data.prepare_tokenizer(config.data, documents, workdir)
    tokenizer = load_tokenizer(tokenizer_spec)
    model_config = experiment.model_config(config.model, tokenizer.vocab_size)
    if config.sample_prompts:  # checked now, not found after the last step
        try:
            check_request(
                model_config,
                [tokenizer.encode(p) for p in config.sample_prompts.split("|")],
                config.sample_tokens,
                vocab_limit=tokenizer.vocab_size,
            )
        except ValueError as e:
            raise ValueError(f"config.sample_prompts / config.sample_tokens: {e}") from None
    run_config = RunConfig(experiment=config, model=model_config, tokenizer=tokenizer_spec)
    datasets = {
        split: functools.partial(
            data.make_dataset,
            documents,
            tokenizer_spec,
            seq_len=config.seq_len,
            batch_size=experiment.process_batch_size(config),
            seed=config.seed,
            split=split,
            eval_fraction=config.data.eval_fraction,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            packing_bins=config.data.packing_bins or None,
            worker_count=config.data.worker_count,
        )
        for split in ("train", "eval")
    }
    check_eval_split(config, datasets["eval"])
    checkpointer = None
    if config.checkpoint_every_steps:
        checkpointer = checkpoint.Checkpointer(
            os.path.join(workdir, CHECKPOINTS),
            keep=config.keep_checkpoints,
            keep_best=config.keep_best_checkpoint,
        )
    tx = make_optimizer(config)
    train_iter = iter(datasets["train"]())
    try:
        graphdef, first_step, params, opt_state, frozen = initial_state(
            model_config,
            tx,
            mesh,
            checkpointer=checkpointer,
            data_iterator=train_iter,
            init_from=config.init_from,
            seed=config.seed,
            run_config=run_config,
        )
    except BaseException:  # a refused resume: nothing was saved, nothing to wait for
        if checkpointer is not None:
            checkpointer.close()
        raise
    run_config.write(workdir)  # only now: a refused resume leaves the workdir as it was
    log.info(
        "model %s: %.1fM parameters, %.1fM active; mesh %s; from step %d",
        config.model.preset,
        model_config.num_params() / 1e6,
        model_config.num_active_params() / 1e6,
        dict(mesh.shape),
        first_step,
    )
    log.info("%s", plan_moe(model_config, mesh).describe())
    writer = MetricsWriter(workdir, config.total_steps, console=progress)
    writer.advance(first_step)
    return _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        run_config=run_config,
        datasets=datasets,
        train_iter=train_iter,
        checkpointer=checkpointer,
        graphdef=graphdef,
        params=params,
        opt_state=opt_state,
        frozen=frozen,
        first_step=first_step,
        train_step=make_train_step(graphdef, tx, config.grad_accum_steps),
        eval_step=make_eval_step(graphdef),
        writer=writer,
        schedule=learning_rate_schedule(config),
        last_log=(first_step, time.perf_counter()),
        jitter_key=jax.random.key(config.seed) if model_config.moe_jitter_eps else None,
    )


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> dict[str, object]:
    """Trains per `config` (see experiment.base_config) in `workdir`, resuming from its latest
    complete checkpoint; returns a summary (with `preempted` True if SIGTERM cut it short).
    `progress=False` leaves out the console progress bar (metrics still go to the workdir)."""
    start = time.perf_counter()
    run = _start_run(config, workdir, progress)
    scores = {}
    if config.score_references and jax.process_index() == 0:
        scores["before"] = _score_references(run, config)
    preempted = False
    try:
        with _Preemption() as preemption:
            for step in range(run.first_step, config.total_steps):
                run.step(step)
                done = step + 1
                preempted = preemption.requested or run.preemption_reached(done)
                log_now, save_now = run.log_due(done), run.save_due(done, preempted)
                if log_now or save_now or len(run.pending_skipped) >= _READ_SKIPPED_EVERY:
                    run.read_skipped()
                if log_now:
                    run.log(done)
                eval_loss = run.maybe_evaluate(done)
                run.writer.advance(done)
                if save_now:
                    run.save(done, eval_loss)
                if preempted:
                    break
    finally:
        run.close()
    if scores:
        scores["after"] = _score_references(run, config)
    samples = {}
    if config.sample_prompts and jax.process_index() == 0:
        samples = sample_text(
            nnx.merge(run.graphdef, run.params, *run.frozen),
            load_tokenizer(run.run_config.tokenizer),
            config.sample_prompts.split("|"),
            config.sample_tokens,
        )
    return {
        "steps": run.last_log[0],
        "first_loss": run.history[0][1] if run.history else float("nan"),
        "last_loss": run.history[-1][1] if run.history else float("nan"),
        "eval_loss": run.eval_history[-1][1] if run.eval_history else float("nan"),
        "wall_s": time.perf_counter() - start,
        "preempted": preempted,
        "samples": samples,
        "loss_curve": run.history,
        **({"reference_scores": scores} if scores else {}),
    }


def _score_references(run: _Run, config: ml_collections.ConfigDict) -> dict[str, dict]:
    """The model's greedy replies to `config.score_references` kjv_chat references of each
    split, scored (sft.score_references): the held-out ones (what it generalises to) and as many
    training ones (what it has learned)."""
    model = nnx.merge(run.graphdef, run.params, *run.frozen)
    replies = chat_replies(model, load_tokenizer(run.run_config.tokenizer))
    scores = {}
    for split, name in (("eval", "held_out"), ("train", "train")):
        examples = sft.kjv_chat(split)[: config.score_references]
        scores[name] = score = sft.score_references(replies, examples)
        log.info(
            "%s references: exact match %.1f%%, character accuracy %.1f%% (%d)",
            name.replace("_", "-"),
            100 * score["exact_match"],
            100 * score["char_accuracy"],
            score["count"],
        )
    return scores
