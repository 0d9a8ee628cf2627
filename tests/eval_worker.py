"""Scores log-likelihood requests and generates greedily with an export loaded onto a mesh
spanning every process (expert 4 x tensor 2), the way the lm-eval backend does, and prints the
answers as JSON. Started by tests/test_evaluation.py as 1 process x 8 devices or 2 x 4:

    python tests/eval_worker.py --export=DIR --num_processes=2 --process_id=0 --port=1234 \
        --devices=4
"""

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--export", required=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8)
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
    answers, tokens = run(args.export)
    print(json.dumps({"process": jax.process_index(), "answers": answers, "tokens": tokens}))


def run(export: str):
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
