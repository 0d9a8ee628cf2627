"""Every config file loads into a valid model config; the entry points refuse what they do not
know. (The entry points' runs are tested with what they do: test_train, test_checkpoint,
test_convert, test_generate, test_benchmarks.)"""

import importlib.util

import pytest

from dbrx_jax import experiment, sharding
from dbrx_jax.aot.topology import parse_target
from tests import helpers

CONFIG_FILES = sorted((helpers.ROOT / "configs").glob("*.py"))
ENTRY_POINTS = sorted(
    p.relative_to(helpers.ROOT) for p in (helpers.ROOT / "experiments").glob("*.py")
)


def test_there_are_configs():
    assert {p.name for p in CONFIG_FILES} >= {"tiny.py", "demo.py", "bench.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_file_loads(path):
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    experiment.validate(config)
    assert experiment.model_config(config.model).num_params() > 0
    if hasattr(module, "TOPOLOGY"):  # a TPU slice's config: its mesh fits that slice
        devices = parse_target(module.TOPOLOGY).devices()
        assert sharding.make_mesh(dict(config.mesh), devices=devices).devices.size == len(devices)
    else:
        sharding.make_mesh(dict(config.mesh))  # fits the 8 test devices


@pytest.mark.slow
@pytest.mark.parametrize("path", ENTRY_POINTS, ids=[p.name for p in ENTRY_POINTS])
def test_entry_points_refuse_unknown_flags(path):
    result = helpers.run(str(path), "--nope=1", timeout=120, check=False)
    assert result.returncode != 0 and "nope" in result.stderr
