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

A restore that fails says why, in one of three classes, each naming the checkpoint:
  ConfigMismatchError     the checkpoint is intact but is not this run's: another architecture,
                          or a state tree, shape or dtype this run's config does not make (an
                          optimizer changed from adamw to lion). Compared with Orbax's stored
                          metadata before any array is read; the stored run config tells what
                          changed.
  CheckpointCorruptError  a file or chunk of it is missing, truncated or unparseable.
  CheckpointIOError       it could not be read for a reason outside it (permission denied, a
                          storage error): nothing is wrong with it.
Only corruption makes a resume fall back to the previous step; the corrupt step directory is
then moved aside to `<step>.corrupt-<n>` (a name Orbax neither lists as a step nor deletes as
an unfinished save), so the run can save that step again. Missing chunks never read as zeros:
Orbax opens arrays with `fill_missing_data_reads=False` when the item's metadata says every
chunk was stored, and for an item written before Orbax recorded that, every chunk is checked.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from dbrx_jax.config import DbrxConfig
from dbrx_jax.io import files

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
EXPORT_CONFIG = "dbrx_config.json"  # marks a params-only export directory
EXPORT_PARAMS = "params"


class ConfigMismatchError(ValueError):
    """The checkpoints are not this run's: another model, or a state (optimizer, shapes,
    dtypes) this run's config does not make. Never a reason to fall back or start over."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files or chunks are missing, truncated or unparseable: the only failure a
    resume falls back from."""


class CheckpointIOError(OSError):
    """A checkpoint could not be read for a reason outside it (permission denied, a storage
    error): fix that and run again; the checkpoint is left as it is."""


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

    def stored_config(self, step: int) -> dict | None:
        """The run config saved with `step` (its `config` item), or None if it has none."""
        if not _dir_exists(self._item_dir(step, CONFIG), self._where(step), f"its {CONFIG} item"):
            return None
        with _reading(self._where(step), f"its {CONFIG} item"):
            return self._manager.restore(
                step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
            )[CONFIG]

    def restore(
        self,
        step: int,
        abstract_state,
        data_iterator,
        expected_config: Mapping[str, Any] | None = None,
    ):
        """The state (arrays laid out as `abstract_state`'s shardings say, whatever mesh they
        were saved from) and the data iterator moved to where it was. Checked first as
        `restore_state` says; raises one of the module docstring's three classes."""
        self._check_data_position(step)
        state = self.restore_state(step, abstract_state, expected_config)
        with _reading(self._where(step), f"its {DATA} item"):
            self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{DATA: grain.checkpoint.CheckpointRestore(data_iterator)}
                ),
            )
        return state

    def restore_state(
        self, step: int, abstract_state, expected_config: Mapping[str, Any] | None = None
    ):
        """Only the state item (e.g. for an export), laid out as `abstract_state` says. Before
        any array is read: the stored run config's architecture against `expected_config`'s
        (a run config as saved, when given), then the stored tree, shapes and dtypes against
        `abstract_state` (ConfigMismatchError naming the first differing leaves and what the
        run config changed)."""
        where = self._where(step)
        stored_config = self.stored_config(step) if expected_config is not None else None
        if stored_config and "architecture" in stored_config and "architecture" in expected_config:
            _check_architecture(
                stored_config["architecture"], expected_config["architecture"], self.directory
            )
        item_dir = self._require_item(step, STATE)
        tree, raw_metadata = _stored_tree(
            item_dir, where, f"its {STATE} item", lambda: self._manager.item_metadata(step)[STATE]
        )
        differences = _tree_differences(tree, abstract_state)
        if differences:
            changes = _config_changes(stored_config or {}, expected_config or {})
            raise _mismatch(
                where,
                differences,
                f"the run's config differs from the stored one in {', '.join(changes[:5])}"
                if changes
                else "",
                "resume with the config it was saved with, or use another --workdir",
            )
        _check_every_chunk_stored(item_dir, raw_metadata, tree, where, f"its {STATE} item")
        with _reading(where, f"its {STATE} item"):
            return self._manager.restore(
                step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
            )[STATE]

    def restore_latest(
        self, abstract_state, data_iterator, expected_config: Mapping[str, Any] | None = None
    ):
        """(step, state) from the newest checkpoint that restores, or (None, None) if there is
        none. Only a corrupt step is passed over: once an older one restores, each corrupt newer
        one is moved aside (`<step>.corrupt-<n>`, with a warning saying where), so the run can
        save that step again. A mismatch or I/O error is raised at once; if no step restores,
        an error lists each step and its reason, and nothing is moved."""
        corrupt: list[tuple[int, CheckpointCorruptError]] = []
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, abstract_state, data_iterator, expected_config)
            except CheckpointCorruptError as e:
                corrupt.append((step, e))
                continue
            for bad_step, error in corrupt:
                log.warning(
                    "%s; moved it to %s (inspect, then delete it) and resumed from step %d",
                    error,
                    self._set_aside(bad_step),
                    step,
                )
            return step, state
        if corrupt:
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} restores, and the run will not start over; "
                f"nothing was moved or deleted: {'; '.join(str(e) for _, e in corrupt)}"
            )
        return None, None

    def _where(self, step: int) -> str:
        return f"checkpoint {self.directory}/{step}"

    def _item_dir(self, step: int, item: str) -> str:
        return os.path.join(self.directory, str(step), item)

    def _require_item(self, step: int, item: str) -> str:
        """The directory of `step`'s `item`; a missing one is corruption."""
        path = self._item_dir(step, item)
        if not _dir_exists(path, self._where(step), f"its {item} item"):
            raise _corrupt(self._where(step), f"its {item} item is missing ({path})")
        return path

    def _check_data_position(self, step: int) -> None:
        """The data item holds this process' position (grain's file per process); one saved by
        another number of processes is a mismatch, a missing file corruption."""
        where, path = self._where(step), self._require_item(step, DATA)
        count = jax.process_count()
        if os.path.exists(os.path.join(path, f"process_{jax.process_index()}-of-{count}.json")):
            return
        pattern = re.compile(r"process_\d+-of-(\d+)\.json")
        saved = {m[1] for name in os.listdir(path) if (m := pattern.fullmatch(name))}
        if saved and str(count) not in saved:
            raise ConfigMismatchError(
                f"{where} holds the data position of {' or '.join(sorted(saved))} processes and "
                f"this run has {count}: resume with as many processes, or use another --workdir"
            )
        raise _corrupt(where, f"its {DATA} item has no position for process {jax.process_index()}")

    def _set_aside(self, step: int) -> str:
        """Renames corrupt step `step` to `<step>.corrupt-<n>`: not a step name for Orbax's
        listing (digits only) nor an unfinished save for its cleanup (`.orbax-checkpoint-tmp`),
        so it is kept, out of the way. Returns the new path."""
        source = os.path.join(self.directory, str(step))
        n = 1
        while os.path.lexists(f"{source}.corrupt-{n}"):
            n += 1
        target = f"{source}.corrupt-{n}"
        multi = jax.process_count() > 1
        if multi:  # every process has chosen the name before it is taken
            multihost_utils.sync_global_devices(f"set aside {source}")
        if jax.process_index() == 0:
            os.rename(source, target)
        if multi:
            multihost_utils.sync_global_devices(f"set aside {source} done")
        self._manager.reload()
        return target

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
    _check_architecture(stored.get("architecture", {}), config.architecture(), where)


def _check_architecture(before: Mapping[str, Any], now: Mapping[str, Any], where: str) -> None:
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigMismatchError(
            f"{where} holds checkpoints of a different model ({details}). Use another "
            "--workdir, or delete the checkpoints if they are no longer wanted."
        )


def is_export(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), EXPORT_CONFIG))


EXPORT_OUTPUT = files.OutputKind("a dbrx_jax export", is_export)


def export_params(
    params,
    config: DbrxConfig,
    directory: str,
    *,
    inputs: Sequence[str] = (),
    overwrite: bool = False,
    tokenizer_file: str | None = None,
) -> None:
    """A params-only checkpoint (`directory/params`) plus `dbrx_config.json`: what
    `from_pretrained(directory)` loads and `train` can start from (`init_from`). Written by the
    rule of io/files.py (atomic; an existing export replaced only with `overwrite`; never
    over one of `inputs`, the paths the parameters were read from). Every process calls it.
    `tokenizer_file` (a run's sentencepiece model) is copied in, where generation and
    evaluation look for a checkpoint's tokenizer."""
    multi = jax.process_count() > 1
    with files.output_directory(
        directory,
        inputs=inputs,
        kind=EXPORT_OUTPUT,
        overwrite=overwrite,
        primary=jax.process_index() == 0,
        barrier=multihost_utils.sync_global_devices if multi else None,
    ) as tmp:
        with files.termination_deferred():  # Orbax's threads would write on after an exception
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(os.path.join(tmp, EXPORT_PARAMS), params)
            checkpointer.wait_until_finished()
            checkpointer.close()
        if jax.process_index() == 0:
            with open(os.path.join(tmp, EXPORT_CONFIG), "w") as f:
                f.write(config.to_json())
            if tokenizer_file:
                shutil.copy(tokenizer_file, tmp)


def load_export_config(path: str | os.PathLike) -> DbrxConfig:
    file = os.path.join(os.fspath(path), EXPORT_CONFIG)
    try:
        return DbrxConfig.from_dict(files.read_json(file, "a DbrxConfig JSON object"))
    except TypeError as e:  # unknown or missing fields
        raise ValueError(f"{file}: not a DbrxConfig ({e})") from None


def restore_params(path: str, abstract_params):
    """Parameters of an export (ours, OCDBT, or the converter's plain zarr), laid out as
    `abstract_params`' shardings say. Checked against the stored tree, shapes and dtypes first
    (ConfigMismatchError); a damaged export raises CheckpointCorruptError, never zeros."""
    path = os.path.abspath(path)
    where, item_dir = f"export {path}", os.path.join(path, EXPORT_PARAMS)
    if not _dir_exists(item_dir, where, EXPORT_PARAMS):
        raise _corrupt(where, f"{item_dir} is missing")
    checkpointer = ocp.StandardCheckpointer()
    try:
        tree, raw_metadata = _stored_tree(
            item_dir, where, EXPORT_PARAMS, lambda: checkpointer.metadata(item_dir).item_metadata
        )
        differences = _tree_differences(tree, abstract_params)
        if differences:
            raise _mismatch(
                where,
                differences,
                f"its {EXPORT_CONFIG} does not describe the parameters stored with it",
                "export it again, or load it with the config it was exported with",
            )
        _check_every_chunk_stored(item_dir, raw_metadata, tree, where, EXPORT_PARAMS)
        with _reading(where, EXPORT_PARAMS):
            return checkpointer.restore(item_dir, abstract_params)
    finally:
        checkpointer.close()


# ---------------------------------------------------------------------------------------------
# What went wrong with a checkpoint: the checks made before restoring, and the three classes.

# TensorStore reports failures as `ValueError("<absl status code>: ...")` (Orbax wraps them in a
# bare Exception): the code is the only structured part of the error, so it decides the class.
_IO_STATUS = (
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "CANCELLED",
    "UNAUTHENTICATED",
)
_CORRUPT_STATUS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_STATUS = re.compile(rf"\b({'|'.join(_IO_STATUS + _CORRUPT_STATUS)}): ")


def _corrupt(where: str, detail: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{where} cannot be restored: {detail}")


def _one_line(text: str, limit: int = 300) -> str:
    text = text.split(" [tensorstore_spec", 1)[0].split("\n", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _classified(error: BaseException, where: str, what: str) -> Exception | None:
    """`error`, met reading `what` of checkpoint `where`, as a CheckpointIOError or a
    CheckpointCorruptError; None when it is neither (it then goes up as it is)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            return _corrupt(where, f"{what}: {error.filename or error} is missing")
        if isinstance(error, OSError):
            return CheckpointIOError(f"{where} cannot be read: {what}: {error}")
        if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
            return _corrupt(where, f"{what} holds a file that is not valid JSON ({error})")
        status = _STATUS.search(str(error))
        if status:
            detail = _one_line(str(error)[status.start() :])
            if status.group(1) in _IO_STATUS:
                return CheckpointIOError(f"{where} cannot be read: {what}: {detail}")
            return _corrupt(where, f"{what}: {detail}")
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def _reading(where: str, what: str) -> Iterator[None]:
    """Raises a failure to read `what` of checkpoint `where` as one of the three classes (an
    error that is none of them goes up unchanged)."""
    try:
        yield
    except (ConfigMismatchError, CheckpointCorruptError, CheckpointIOError):
        raise
    except Exception as e:
        known = _classified(e, where, what)
        if known is None:
            raise
        raise known from e


def _dir_exists(path: str, where: str, what: str) -> bool:
    """Whether directory `path` exists; unlike os.path.isdir, one that cannot be listed
    (permission denied) is a CheckpointIOError, not a missing directory (which readers below
    would report as a missing file: corruption)."""
    try:
        os.listdir(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise _corrupt(where, f"{what}: {path} is not a directory") from None
    except OSError as e:
        raise CheckpointIOError(f"{where} cannot be read: {what}: {e}") from e
    return True


def _stored_tree(item_dir: str, where: str, what: str, read_metadata: Callable[[], Any]):
    """(the stored tree of an Orbax PyTree item, its ArrayMetadata as leaves; its `_METADATA`
    JSON). `_METADATA` is read here first: Orbax reports a missing or unreadable one as None,
    or later as a tree-structure error, which would read as a mismatch."""
    path = os.path.join(item_dir, "_METADATA")
    with _reading(where, what):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise _corrupt(where, f"{what}: {path} is not valid JSON ({e})") from None
    with _reading(where, f"{what}'s array metadata"):
        metadata = read_metadata() if isinstance(raw, dict) else None
    if metadata is None:
        raise _corrupt(where, f"{what}: Orbax cannot read the arrays' metadata ({path})")
    return metadata.tree, raw


def _tree_differences(stored, abstract) -> list[str]:
    """Each leaf path (`opt_state/1/0/nu/wte/value`) where the stored tree and `abstract`
    differ: present in one only, or another shape or dtype; in `abstract`'s order."""
    have = ocp.tree.to_flat_dict(stored, keep_empty_nodes=True)
    want = ocp.tree.to_flat_dict(abstract, keep_empty_nodes=True)
    out = []
    for key in [*want, *(k for k in have if k not in want)]:
        name = "/".join(map(str, key))
        if key not in have:
            out.append(f"{name} (not in the checkpoint)")
        elif key not in want:
            out.append(f"{name} (not in this run's state)")
        elif hasattr(have[key], "shape") or hasattr(want[key], "shape"):
            stored_as, wanted_as = _describe(have[key]), _describe(want[key])
            if stored_as != wanted_as:
                out.append(f"{name} ({stored_as} stored, {wanted_as} expected)")
    return out


def _describe(leaf) -> str:
    if not hasattr(leaf, "shape"):
        return "no array"
    return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def _config_changes(stored: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list:
    """`key: stored -> now` for each leaf where two saved run configs differ (keys dotted)."""
    out = []
    for key in [*now, *(k for k in stored if k not in now)]:
        if not prefix and key == "architecture":  # repeats `model`
            continue
        before, after = stored.get(key, "(none)"), now.get(key, "(none)")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            out += _config_changes(before, after, f"{prefix}{key}.")
        elif before != after:
            out.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return out


def _mismatch(where: str, differences: list[str], why: str, advice: str) -> ConfigMismatchError:
    shown = ", ".join(differences[:3])
    if len(differences) > 3:
        shown += f" and {len(differences) - 3} more"
    if why:
        shown += f"; {why}"
    return ConfigMismatchError(
        f"{where} does not fit this run's state: {shown}. Nothing was changed: {advice}."
    )


def _check_every_chunk_stored(
    item_dir: str, raw_metadata: dict, tree, where: str, what: str
) -> None:
    """Orbax reads a missing chunk as zeros unless the item's `_METADATA` says every chunk was
    stored (`store_array_data_equal_to_fill_value`, which Orbax writes now and then opens each
    array with `fill_missing_data_reads=False`). For an item written without it, checks that
    every zarr v2 array without a fill value (Orbax's and the converter's, which store every
    chunk) has all its chunks."""
    if raw_metadata.get("store_array_data_equal_to_fill_value"):
        return
    base = {"driver": "file", "path": item_dir + "/"}
    ocdbt = os.path.exists(os.path.join(item_dir, "manifest.ocdbt"))
    with _reading(where, what):
        store = ts.KvStore.open({"driver": "ocdbt", "base": base} if ocdbt else base).result()
        keys = {key.decode() for key in store.list().result()}
        for leaf in ocp.tree.to_flat_dict(tree).values():
            name = getattr(leaf, "name", None)
            if name is None:
                continue
            zarray = store.read(f"{name}/.zarray").result()
            if zarray.state != "value":
                raise _corrupt(where, f"{what}: {name}/.zarray is missing")
            spec = json.loads(zarray.value)
            if spec.get("zarr_format") != 2 or spec.get("fill_value") is not None:
                continue  # chunks equal to the fill value may never have been written
            separator = spec.get("dimension_separator", ".")
            grid = [range(-(-n // c)) for n, c in zip(spec["shape"], spec["chunks"], strict=True)]
            for index in itertools.product(*grid):
                chunk = f"{name}/{separator.join(map(str, index)) or '0'}"
                if chunk not in keys:
                    raise _corrupt(
                        where, f"{what}: chunk {chunk} is missing (it would have read as zeros)"
                    )
