"""Test set-up: 8 fake CPU devices (set before JAX is imported anywhere) and shared fixtures."""

import os

# The suite compiles hundreds of small programs and runs each a few times: LLVM's optimisation
# of the generated CPU code costs more than it saves (on 2 cores the quick subset took 139 s
# with it, 97 s without; the whole suite 929 s and 749 s). XLA's own passes and the GEMM
# libraries are the same either way. A level in the caller's XLA_FLAGS comes later and wins.
os.environ["XLA_FLAGS"] = " ".join(
    [
        "--xla_backend_optimization_level=0",
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
    ]
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
