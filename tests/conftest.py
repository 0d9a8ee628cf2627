"""Test set-up: 8 fake CPU devices (set before JAX is imported anywhere) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests that compile for a TPU slice load libtpu, which by default allows one process per host
# (a lockfile): let the pytest-xdist workers (and their subprocesses) share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (the exactness checks)."""
    with jax.enable_x64(True):
        yield
