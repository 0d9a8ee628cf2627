"""Checkpoints with Orbax: exact resume, preemption, restore onto another mesh, and exports.

A training checkpoint (`workdir/checkpoints/<step>/`) holds three items:
  state   parameters, optimizer state, step and the base PRNG key (one sharded PyTree)
  data    the grain iterator's position, per process
  config  the experiment and model config (JSON), checked on resume
Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: Orbax
writes into a temporary directory and renames it when complete, so an interrupted save leaves
no step that looks complete. The manager keeps the latest N steps and, optionally, the best by
eval loss. A params-only export (`export_params`) is what `from_pretrained` and generation load.
What a training run puts in these, and how it resumes, is dbrx_jax/state.py's business.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from dbrx_jax.config import DbrxConfig

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
EXPORT_CONFIG = "dbrx_config.json"  # marks a params-only export directory
EXPORT_PARAMS = "params"


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of a different model."""


class Checkpointer:
    """`orbax.checkpoint.CheckpointManager` for training state, data position and config."""

    def __init__(
        self, directory: str, *, keep: int = 3, keep_best: bool = False, async_save: bool = True
    ):
        self.directory = os.path.abspath(directory)
        policies = [preservation.LatestN(n=keep)]
        if keep_best:
            policies.append(
                preservation.BestN(
                    get_metric_fn=lambda m: m["eval_loss"],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state,
        data_iterator,
        config: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(state),
                    DATA: grain.checkpoint.CheckpointSave(data_iterator),
                    CONFIG: ocp.args.JsonSave(dict(config)),
                }
            ),
            metrics=dict(metrics) if metrics else None,
            force=True,
        )

    def stored_config(self, step: int) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )[CONFIG]

    def restore(self, step: int, abstract_state, data_iterator):
        """The state (arrays laid out as `abstract_state`'s shardings say, whatever mesh they
        were saved from) and the data iterator moved to where it was."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: grain.checkpoint.CheckpointRestore(data_iterator),
                }
            ),
        )
        return restored[STATE]

    def restore_state(self, step: int, abstract_state):
        """Only the state item (e.g. for an export), laid out as `abstract_state` says."""
        return self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
        )[STATE]

    def restore_latest(self, abstract_state, data_iterator):
        """(step, state) from the newest checkpoint that restores; a step that fails (a corrupt
        or partly deleted directory) is skipped with a warning naming it. (None, None) if there
        is none."""
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # any failure means: try the previous step
                log.warning(
                    "checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                    self.directory,
                    step,
                    type(e).__name__,
                    str(e)[:300],
                )
        return None, None

    def reached_preemption(self, step: int) -> bool:
        """True at the step where every process agreed to save for a preemption notice
        (JAX's multi-controller preemption service); False outside jax.distributed."""
        try:
            return self._manager.reached_preemption(step)
        except Exception:  # no preemption service in this runtime
            return False

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_same_model(stored: Mapping[str, Any], config: DbrxConfig, where: str) -> None:
    """Refuses to resume (or overwrite) checkpoints of a different model architecture."""
    before = stored.get("architecture", {})
    now = config.architecture()
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigMismatchError(
            f"{where} holds checkpoints of a different model ({details}). Use another "
            "--workdir, or delete the checkpoints if they are no longer wanted."
        )


def export_params(params, config: DbrxConfig, directory: str) -> None:
    """A params-only checkpoint (`directory/params`) plus `dbrx_config.json`: what
    `from_pretrained(directory)` loads and `train` can start from (`init_from`)."""
    directory = os.path.abspath(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, EXPORT_PARAMS), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, EXPORT_CONFIG), "w") as f:
            f.write(config.to_json())


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def load_export_config(path: str) -> DbrxConfig:
    with open(os.path.join(path, EXPORT_CONFIG)) as f:
        return DbrxConfig.from_json(f.read())


def restore_params(path: str, abstract_params):
    """Parameters of an export, laid out as `abstract_params`' shardings say."""
    return ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(path), EXPORT_PARAMS), abstract_params
    )
