"""Train a DBRX model from an experiment config (configs/*.py).

    python experiments/train.py --config=configs/tiny.py --workdir=/tmp/tiny
    python experiments/train.py --config=configs/demo.py --config.total_steps=100 \
        --config.mesh.data=2 --config.mesh.expert=4 --workdir=runs/demo

Multi-host: one process per host (TPU) or per GPU (SLURM) runs the same command; JAX reads the
cluster from the environment, or pass --coordinator_address, --num_processes, --process_id.
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dbrx_jax import cli, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where metrics, tokenizer and checkpoints go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    summary = train.train(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        curve, samples = summary.pop("loss_curve"), summary.pop("samples")
        print(json.dumps(summary, indent=2))
        print("loss curve:", ", ".join(f"{step}: {loss:.3f}" for step, loss in curve))
        for prompt, text in samples.items():
            print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    cli.run(main)
