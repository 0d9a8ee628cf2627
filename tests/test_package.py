"""The package's shape: imports layered without cycles, no function-local import of our own
modules, the library free of torch and of the repository's benchmarks, and an installed copy that
works away from the checkout."""

import ast
import pathlib
import subprocess
import sys

import pytest

from tests import helpers

PACKAGE = helpers.ROOT / "dbrx_jax"
# Third-party packages a library function may import when (and only when) it needs them.
OPTIONAL = {"tokamax", "jax.experimental.pallas.ops.gpu", "jax.experimental.pallas.ops.tpu"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(helpers.ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(node: ast.AST, modules=()) -> list[str]:
    """What an import statement imports: `from a import b` is module a.b when that is one of
    `modules`, else (a name defined in) module a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
        return [name if name in modules else node.module for name in names]
    return []


def _graph() -> dict[str, set[str]]:
    """module -> the dbrx_jax modules it imports at module level (`if TYPE_CHECKING` excluded)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            edges |= {m for m in _imports(node, modules) if m in modules and m != name}
        graph[name] = edges
    return graph


def test_library_imports_form_layers_without_cycles():
    graph = _graph()
    order, state = [], {}

    def visit(module, stack):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*stack, module])}"
        state[module] = "open"
        for dependency in sorted(graph[module]):
            visit(dependency, [*stack, module])
        state[module] = "done"
        order.append(module)

    for module in sorted(graph):
        visit(module, [])
    assert len(order) == len(graph)


def test_no_function_local_import_but_optional_packages():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                for module in _imports(node):
                    if not any(module == o or module.startswith(o + ".") for o in OPTIONAL):
                        found.append(f"{path.relative_to(helpers.ROOT)}:{node.lineno} {module}")
    assert found == [], "function-local imports (move them to the top): " + ", ".join(found)


FOREIGN = ("torch", "transformers", "benchmarks", "tests")


def test_the_library_never_imports_torch_transformers_or_benchmarks():
    """No library module imports them, at any depth of its code; and importing the library
    loads none of them. (Except through tensorboardX, which loads torch when it is installed,
    as it is for the tests: the metrics writer and what imports it are left out of the run.)"""
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            for module in _imports(node):
                assert module.split(".")[0] not in FOREIGN, f"{path}: imports {module}"
    graph = _graph()

    def reaches(module, target, seen=()):
        return module == target or any(
            reaches(m, target, (*seen, module)) for m in graph[module] if m not in seen
        )

    modules = sorted(m for m in graph if not reaches(m, "dbrx_jax.metrics"))
    assert {"dbrx_jax", "dbrx_jax.io.convert", "dbrx_jax.generate", "dbrx_jax.state"} <= set(
        modules
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FOREIGN!r})\n"
        "assert not bad, bad[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd="/", env=helpers.env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_a_non_editable_install_works_from_another_directory(tmp_path):
    """`pip install .` (a wheel, not the editable install): from another directory the copy
    imports, builds a model and finds its data files without the checkout, and holds neither
    the tests nor the benchmarks."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, helpers.ROOT],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert {p.name for p in site.iterdir() if not p.name.endswith("-info")} == {"dbrx_jax"}
    code = (
        "import dbrx_jax, pathlib; from flax import nnx\n"
        f"assert dbrx_jax.__file__.startswith({str(site)!r}), dbrx_jax.__file__\n"
        "from dbrx_jax import data\n"
        "assert pathlib.Path(data.kjv_path()).is_file()\n"
        "from dbrx_jax.evaluation import TASKS_DIR\n"  # the lm-eval task set travels as data
        "assert pathlib.Path(TASKS_DIR, 'kjv', 'kjv_choice.yaml').is_file()\n"
        "assert pathlib.Path(TASKS_DIR, 'kjv', 'verses_test.jsonl').is_file()\n"
        "m = dbrx_jax.Dbrx(dbrx_jax.DbrxConfig.preset('dbrx-tiny'), rngs=nnx.Rngs(0))\n"
        "print(m.plan.describe())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=helpers.env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MoE plan (cpu)" in result.stdout
