"""Runs a job on a mesh spanning every process and prints its results as JSON. Started by the
tests as 1 process x 8 devices or 2 x 4 (helpers.run_processes):

    python tests/distributed_worker.py --num_processes=2 --process_id=0 --port=12345 --devices=4

--job=train: a few training steps of a tiny model (data 2 x expert 4); prints the losses.
--job=eval --export=DIR: log-likelihoods and greedy tokens of fixed requests with the export
  loaded onto expert 4 x tensor 2, as the lm-eval backend runs them.
"""

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=("train", "eval"), default="train")
    parser.add_argument("--export", help="--job=eval: the export to load")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax

    from dbrx_jax import sharding

    if args.num_processes > 1:
        sharding.initialize_distributed(
            f"localhost:{args.port}", args.num_processes, args.process_id
        )
    assert jax.device_count() == 8, jax.devices()
    if args.job == "train":
        result = {"losses": train_losses(args.steps)}
    else:
        answers, tokens = score_and_generate(args.export)
        result = {"answers": answers, "tokens": tokens}
    print(json.dumps({"process": jax.process_index(), **result}))


def train_losses(steps: int) -> list[float]:
    import jax
    import numpy as np
    import optax

    from dbrx_jax import DbrxConfig, data, sharding, state, train

    config = DbrxConfig.preset("dbrx-tiny")
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    tx = optax.adamw(1e-3)
    graphdef, params, opt_state, _ = state.init_train_state(config, tx, mesh, seed=0)
    step = train.make_train_step(graphdef, tx)
    rng = np.random.RandomState(0)
    rows_per_process = 8 // jax.process_count()
    losses = []
    for _ in range(steps):
        tokens = rng.randint(0, config.vocab_size, (8, 17)).astype(np.int32)  # the global batch
        mine = tokens[jax.process_index() * rows_per_process :][:rows_per_process]
        batch = sharding.shard_batch(data.model_batch(mine), mesh)
        params, opt_state, metrics = step(params, opt_state, batch, None)
        losses.append(float(metrics["loss"]))
    return losses


def score_and_generate(export: str):
    """(answers, generated tokens) of the fixed requests, on every device there is."""
    import jax
    import numpy as np

    import dbrx_jax
    from dbrx_jax import generate, sharding
    from dbrx_jax.evaluation import scoring

    mesh = sharding.make_mesh({"expert": 4, "tensor": 2})
    model = dbrx_jax.from_pretrained(export, mesh=mesh)
    rng = np.random.RandomState(0)  # the same requests on every process
    requests = [
        (rng.randint(0, 512, n).tolist(), rng.randint(0, 512, k).tolist())
        for n, k in [(5, 3), (5, 4), (30, 9), (12, 1), (60, 20)]
    ]
    answers = scoring.score(model, requests, max_length=64, batch_size=4)
    out = generate.generate(model, [r[0] for r in requests[:3]], max_new_tokens=6)
    return answers, jax.device_get(out.tokens_BX).tolist()


if __name__ == "__main__":
    main()
