"""Every notebook has its paired .ipynb in step with the plain-text twin, and runs from top to
bottom in a fresh kernel without an error, saving its figure."""

import importlib.util
import pathlib

import jupytext
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("execute", NOTEBOOKS_DIR / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)
SOURCES = execute.notebook_sources()
IDS = [p.stem for p in SOURCES]


def test_the_four_notebooks_are_there():
    assert IDS == [
        "01_architecture_tour",
        "02_routing",
        "03_convert_and_compare",
        "04_sharding",
    ]


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_is_paired(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{source.name} has no paired .ipynb (run `make notebooks`)"
    text, notebook = jupytext.read(source), jupytext.read(paired)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in text.cells
    ], f"{paired.name} is out of step with {source.name} (run `make notebooks`)"
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert any(c.get("outputs") for c in code_cells), (
        f"{paired.name} was saved without its outputs (run `make notebooks`)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_runs(source, tmp_path):
    _, seconds = execute.execute(source, tmp_path)
    figures = list((tmp_path / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 10_000 for f in figures), figures
    print(f"{source.stem}: {seconds:.0f} s")
