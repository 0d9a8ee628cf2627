"""Runs the notebooks from their plain-text twins (jupytext percent format) in a fresh kernel
and writes each paired .ipynb with its outputs and plots. `make notebooks` runs it; the test
suite runs the same function in a scratch directory.

    python notebooks/execute.py                    # every notebook
    python notebooks/execute.py 02_routing.py      # some of them
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import jupytext
import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def notebook_sources() -> list[pathlib.Path]:
    """The plain-text twins, in reading order (01_..., 02_..., ...)."""
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def execute(
    source: pathlib.Path, run_dir: pathlib.Path, timeout: int = 900
) -> tuple[nbformat.NotebookNode, float]:
    """The notebook of `source` executed with `run_dir` as its working directory, and the
    seconds it took. Any cell's error raises nbclient's CellExecutionError."""
    notebook = jupytext.read(source)
    # The kernel starts as Jupyter would start it: a notebook that wants simulated devices
    # asks for them itself, before it imports JAX. The repository root goes on its path for
    # `benchmarks/` (not installed), which holds the transformers reference notebook 03 uses.
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(run_dir)}},
    )
    start = time.perf_counter()
    client.execute(env=env)
    return notebook, time.perf_counter() - start


def main(names: list[str]) -> None:
    sources = [HERE / name for name in names] if names else notebook_sources()
    for source in sources:
        if not source.is_file():
            raise SystemExit(f"{source}: no such notebook source")
        notebook, seconds = execute(source, HERE)
        jupytext.write(notebook, source.with_suffix(".ipynb"))
        print(f"{source.stem}: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
