"""What several test files share: the repository root and running entry points as subprocesses
(with the 8 simulated CPU devices, from the repository root)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEVICES_ENV = {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
}


def env(**extra: str) -> dict[str, str]:
    """This process' environment with the simulated devices and `extra`."""
    return {**os.environ, **DEVICES_ENV, **extra}


def command(target: str, *args: str) -> list[str]:
    """The command line of an entry point: a script path (`experiments/train.py`) or a module
    (`benchmarks.bench_moe`), run by this interpreter."""
    if target.endswith(".py"):
        return [sys.executable, str(ROOT / target), *args]
    return [sys.executable, "-m", target, *args]


def run(
    target: str, *args: str, timeout: int = 600, check: bool = True, **env_extra: str
) -> subprocess.CompletedProcess:
    """Runs an entry point to completion from the repository root; with `check`, a non-zero
    exit fails the test with the tail of its stderr."""
    result = subprocess.run(
        command(target, *args),
        cwd=ROOT,
        env=env(**env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(target: str, *args: str, **env_extra: str) -> subprocess.Popen:
    """Starts an entry point in the background (stdout and stderr piped)."""
    return subprocess.Popen(
        command(target, *args),
        cwd=ROOT,
        env=env(**env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_processes(target: str, *args: str, processes: int = 2, devices: int = 4) -> list[dict]:
    """Runs `processes` copies of a jax.distributed worker (tests/distributed_worker.py) on
    this host, `devices` CPU devices each, joined over a free localhost port; returns the JSON
    each printed last, in process order (a failed process fails the test)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        start(
            target,
            *args,
            f"--num_processes={processes}",
            f"--process_id={i}",
            f"--port={port}",
            f"--devices={devices}",
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def json_report(stdout: str):
    """The JSON object an entry point printed after its log lines."""
    return json.loads(stdout[stdout.index("{") : stdout.rindex("}") + 1])
