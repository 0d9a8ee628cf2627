"""The KJV tasks' datasets, for `custom_dataset: !function kjv_data.<name>` in their YAML files.

lm-eval loads this file by path (the YAML's folder first; module name: its full path), so the
name cannot collide with another task's `kjv_data`. The .jsonl files are read from this file's
folder, whatever the current directory; `datasets.load_dataset("json", data_files=...)` would
resolve them against the current directory instead (and write a cache).
"""

from __future__ import annotations

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _split(name: str) -> datasets.Dataset:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])


def verses(**metadata) -> datasets.DatasetDict:
    """kjv_choice and kjv_complete: "test" (100 verses) and "train" (10, few-shot examples).
    `metadata` (the task's metadata, passed by lm-eval) is not used."""
    return datasets.DatasetDict(
        test=_split("verses_test.jsonl"), train=_split("verses_train.jsonl")
    )


def chapters(**metadata) -> datasets.DatasetDict:
    """kjv_rolling: "test" (16 whole chapters)."""
    return datasets.DatasetDict(test=_split("chapters_test.jsonl"))
