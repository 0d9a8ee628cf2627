"""The rules every reader and writer of a model directory follows, in one place.

Reading. A name found inside a checkpoint (a safetensors index's `weight_map`, ...) is a file
of that checkpoint's directory: `member` refuses an absolute name, `..` and anything else that
would resolve outside it, before anything is opened. (Symbolic links the directory holds are
followed: Hugging Face's cache is made of them, and they were put there by its owner, not read
from a file.) `read_json` names the file in every error.

Writing. `output_directory` is the one overwrite rule of the converter and of exports:
  1. An output that is one of the inputs, holds one, or lies inside one is refused, with or
     without `overwrite` (replacing it would delete what is being read).
  2. An existing output is replaced only with `overwrite`, and only if it is an output of the
     same kind (an HF checkpoint for jax_to_hf, an export for an export). Anything else, an HF
     checkpoint where an export goes, a training workdir, a directory of other files, is never
     replaced. An empty directory is used without asking: there is nothing in it to lose.
  3. Everything is written into `<output>.partial` and renamed into place when complete, so a
     failed or interrupted write never leaves a directory that looks complete. An existing
     output is renamed aside first and deleted only once the new one is in place.
  4. The partial directory is removed when the write fails or is interrupted (Ctrl-C, or
     SIGTERM through dbrx_jax.cli). One left by a killed process (SIGKILL, a power cut) is
     removed by the next write to the same output; a partial directory whose writer is still
     running on this host is refused instead. A SIGTERM is held back (`termination_deferred`)
     while the partial directory is created and while it is renamed into place, and by writers
     around steps that must not be cut in half, such as an Orbax save, whose threads go on
     writing after the main thread stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
SIGTERM_EXIT = 128 + 15  # a process stopped by SIGTERM exits with this status
# Set by a termination request (request_termination). That also raises, but an exception raised
# where Python ignores exceptions (a gc callback) is lost: checked again before an output is put
# in place, so a stopped write never completes.
TERMINATING = threading.Event()
_OWNER_FILE = ".writer"  # inside the partial directory: "<host> <pid>"
_deferring = 0  # how many termination_deferred blocks the main thread is in


def request_termination() -> None:
    """What a SIGTERM does (dbrx_jax.cli's handler calls this in the main thread): raises
    SystemExit(143) now, or at the end of the `termination_deferred` block it lands in."""
    TERMINATING.set()
    if not _deferring:
        raise SystemExit(SIGTERM_EXIT)


@contextlib.contextmanager
def termination_deferred() -> Iterator[None]:
    """Holds back a termination request that lands in the block until the block ends, for steps
    that an exception must not cut in half: an Orbax save stopped in the main thread leaves its
    own threads writing into a directory that is being removed. Only the main thread, where
    signal handlers run, is held back."""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and TERMINATING.is_set():
        raise SystemExit(SIGTERM_EXIT)


# ---------------------------------------------------------------------------------------------
# Reading.


def member(directory: str | os.PathLike, name: Any, source: str) -> str:
    """The path of `name`, a file of `directory` named by `source` (the file that listed it),
    or a ValueError if the name could reach outside the directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{source}: {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise ValueError(
            f"{source}: {name!r} points outside {os.fspath(directory)}; expected the name of "
            "a file in that directory"
        )
    return os.path.join(os.fspath(directory), *(p for p in parts if p not in ("", ".")))


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON file holding an object; every error names the file and `what` was expected."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected {what}, found a JSON {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Writing.


def write_json(path: str | os.PathLike, value: Any, default: Callable | None = None) -> None:
    """`value` as indented JSON at `path`, replacing it whole (a temporary file renamed into
    place): a crash leaves the old file or the new one, never half of one. `default` as for
    json.dump (how to write what JSON has no type for)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=default)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """What an output directory is (`name`, for messages) and how to recognise an existing one
    that `overwrite` may replace."""

    name: str
    recognise: Callable[[str], bool]


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output(
    output: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike],
    kind: OutputKind,
    overwrite: bool,
) -> None:
    """Rules 1 and 2 of the module docstring: raises if writing `output` could destroy an input
    or something the user did not ask to replace."""
    output = os.fspath(output)
    target = _real(output)
    for source in inputs:
        real = _real(source)
        if _inside(target, real) or _inside(real, target):
            raise ValueError(
                f"output {output} overlaps the input {os.fspath(source)}; writing it would "
                "destroy what is being read. Choose an output outside the input."
            )
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output) or os.path.islink(output):
        raise FileExistsError(f"output {output} exists and is not a directory; not replacing it")
    if not os.listdir(output):
        return
    if not overwrite:
        raise FileExistsError(f"output {output} exists; pass --overwrite to replace it")
    if not kind.recognise(output):
        entries = sorted(os.listdir(output))
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"output {output} exists and is not {kind.name} (it holds {shown}); not replacing "
            "it, even with --overwrite. Choose another output, or remove it yourself."
        )


def _writer_alive(partial: str) -> bool:
    """Whether the process that created `partial` is still running on this host."""
    try:
        with open(os.path.join(partial, _OWNER_FILE)) as f:
            host, pid = f.read().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return int(pid) != os.getpid()


def _start_partial(output: str) -> str:
    partial = output + PARTIAL_SUFFIX
    if os.path.lexists(partial):
        if _writer_alive(partial):
            raise FileExistsError(
                f"{partial}: another process on this host is writing {output}; wait for it"
            )
        log.warning("removing %s, left by an interrupted write", partial)
        shutil.rmtree(partial)
    os.makedirs(partial)
    with open(os.path.join(partial, _OWNER_FILE), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    return partial


def _finish(partial: str, output: str) -> None:
    os.remove(os.path.join(partial, _OWNER_FILE))
    if os.path.lexists(output):
        old = output + ".replaced"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(output, old)
        os.rename(partial, output)
        shutil.rmtree(old)
    else:
        os.rename(partial, output)


@contextlib.contextmanager
def output_directory(
    output: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike],
    kind: OutputKind,
    overwrite: bool = False,
    primary: bool = True,
    barrier: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Yields the directory to write `output` into (`<output>.partial`), following the rules of
    the module docstring; it becomes `output` only if the block completes.

    Multi-process writers (an Orbax save on every host) pass `primary` (True on one process:
    the one that checks, creates and renames) and `barrier(name)`, which waits for every
    process; all of them yield the same path."""
    output = os.path.abspath(os.fspath(output))
    partial = output + PARTIAL_SUFFIX
    if primary:
        check_output(output, inputs=inputs, kind=kind, overwrite=overwrite)
        parent = os.path.dirname(output)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"output {output}: its parent directory does not exist")
    ours = False  # whether this process created the partial directory, and so removes it
    try:
        if primary:
            with termination_deferred():  # created and known to be ours, or neither
                _start_partial(output)
                ours = True
        if barrier is not None:
            barrier("output_directory: started")
        yield partial
        if barrier is not None:
            barrier("output_directory: written")
        if TERMINATING.is_set():
            raise SystemExit(SIGTERM_EXIT)  # SIGTERM, whose exception was lost
    except BaseException:
        if ours:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if primary:
        with termination_deferred():  # never between moving the old output aside and the new in
            _finish(partial, output)
    if barrier is not None:
        barrier("output_directory: in place")
