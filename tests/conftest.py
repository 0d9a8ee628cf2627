"""Test set-up: 8 fake CPU devices (set before JAX is imported anywhere) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest


@pytest.fixture
def x64():
    """Runs the test with float64 enabled (the exactness checks)."""
    with jax.enable_x64(True):
        yield
