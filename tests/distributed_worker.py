"""Runs a few training steps of a tiny model on a mesh spanning every process, and prints the
losses as JSON. Started by tests/test_sharding.py as 1 process x 8 devices or 2 x 4:

    python tests/distributed_worker.py --num_processes=2 --process_id=0 --port=12345 --devices=4
"""

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import numpy as np
    import optax

    from dbrx_jax import DbrxConfig, data, sharding, state, train

    if args.num_processes > 1:
        sharding.initialize_distributed(
            f"localhost:{args.port}", args.num_processes, args.process_id
        )
    assert jax.device_count() == 8, jax.devices()
    config = DbrxConfig.preset("dbrx-tiny")
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    tx = optax.adamw(1e-3)
    graphdef, params, opt_state, _ = state.init_train_state(config, tx, mesh, seed=0)
    step = train.make_train_step(graphdef, tx)
    rng = np.random.RandomState(0)
    rows_per_process = 8 // jax.process_count()
    losses = []
    for _ in range(args.steps):
        tokens = rng.randint(0, config.vocab_size, (8, 17)).astype(np.int32)  # the global batch
        mine = tokens[jax.process_index() * rows_per_process :][:rows_per_process]
        batch = sharding.shard_batch(data.model_batch(mine), mesh)
        params, opt_state, metrics = step(params, opt_state, batch, None)
        losses.append(float(metrics["loss"]))
    print(json.dumps({"process": jax.process_index(), "losses": losses}))


if __name__ == "__main__":
    main()
