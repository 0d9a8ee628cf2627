"""What every entry point in experiments/ shares: how it fails and how it is stopped.

    from dbrx_jax import cli
    ...
    if __name__ == "__main__":
        cli.run(main)

- An error the user can fix (a bad flag value, a missing or damaged file, a refused output, a
  checkpoint of another model: ValueError, OSError, FloatingPointError, absl's UsageError) is
  one line on stderr, `<program>: error: <what was wrong and what was expected>`, and exit
  status 1. `-v 1` (absl's --verbosity) shows its traceback instead. Any other exception is a
  bug and keeps its traceback.
- Other libraries' INFO logs (Orbax, JAX, grain) are hidden unless `-v 1`; this package's own
  log lines and warnings still show.
- SIGTERM (a scheduler's stop, `kill`) raises SystemExit(143) in the main thread, so that
  `finally` blocks run and a half-written output is removed (io/files.py, which also holds it
  back through steps that must not be cut in half); training replaces it with its own handler,
  which saves a checkpoint first (train.py).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable

from absl import app
from absl import logging as absl_logging

from dbrx_jax.config import renamed_hint
from dbrx_jax.io import files

USER_ERRORS = (ValueError, OSError, FloatingPointError, app.UsageError)
QUIET_LOGGERS = ("absl", "jax", "jax._src", "orbax", "grain", "tensorstore")


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with the behaviour of the module docstring."""
    app.run(lambda argv: _run_main(main, argv), flags_parser=_parse_flags)


def _fail(message: str) -> None:
    message = " ".join(message.split())
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with an override of a config key that does not exist (ml_collections
    raises a bare KeyError or AttributeError for `--config.no_such_key=1`) as one line naming
    the flag."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\n", "\n").replace("\\'", "'")
        key = re.search(r"\w+", text)
        suggestion = re.search(r'Did you mean "(\w+)"', text)
        for arg in argv[1:]:
            name = arg.split("=", 1)[0]
            if key and name.startswith("--") and key.group() in name.split("."):
                hint = renamed_hint([key.group()])
                if suggestion:
                    hint = f" (did you mean {suggestion.group(1)!r}?)"
                _fail(f"{name}: the config has no key {key.group()!r}{hint}")
        raise


def _terminate(signum, frame):
    files.request_termination()


def _run_main(main: Callable[[list[str]], object], argv: list[str]) -> None:
    verbose = absl_logging.get_verbosity() >= absl_logging.DEBUG
    if not verbose:
        absl_logging.set_verbosity(absl_logging.INFO)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except USER_ERRORS as e:
        if verbose:
            raise
        _fail(str(e) or type(e).__name__)
