"""Evaluation: scoring requests (scoring.py) and the lm-evaluation-harness backend (harness.py,
which needs the `eval` extra: `pip install -e .[eval]`), with a local task set over the KJV
(tasks/kjv, for `--include_path`).

Importing this package does not import lm-eval; `dbrx_jax.evaluation.harness` does.
"""

import os

TASKS_DIR = os.path.join(os.path.dirname(__file__), "tasks")  # for lm-eval's include_path
