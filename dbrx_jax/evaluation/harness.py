"""lm-evaluation-harness backend: our model, scored the way lm-eval's `hf` backend scores an HF
model, without PyTorch.

    lm = DbrxLM(pretrained="runs/demo-export", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["kjv"], task_manager=...)

or by name once this module is imported: `--model dbrx_jax --model_args pretrained=...`.
`experiments/evaluate.py` is the command line.

What the `hf` backend does, this does too, so that the same checkpoint gets the same answers:
- requests are tokenized by lm-eval's `TemplateLM` (trailing spaces of the context move to the
  continuation; an empty context becomes the prefix token, DBRX's <|endoftext|>), with
  special-token text in prompts read as special tokens (chat templates) and no BOS added;
- contexts too long for the window lose tokens on the left (scoring.py);
- `loglikelihood_rolling` cuts a text into lm-eval's disjoint windows of `max_length` tokens;
- `generate_until` left-truncates prompts to `max_length - max_gen_toks`, generates up to
  `max_gen_toks` tokens, stops a row at the tokenizer's stop ids (DBRX: <|endoftext|> and
  <|im_end|>, as the export's generation_config.json), drops special tokens from the text and
  cuts it at the first `until` string (the end-of-text string always among them). Greedy unless
  `do_sample`; sampled text cannot equal PyTorch's (other random numbers).

Many devices and many hosts: the model is loaded on `mesh` (e.g. "tensor=8" or
"expert=4,tensor=2"), its parameters sharded as they load. A model spread over hosts is one
SPMD program, so every host must run every request in the same order: the backend tells
lm-eval it is a single rank (rank 0 of 1) on every host, feeds each host the same batches, and
only process 0 shows progress (experiments/evaluate.py writes results from process 0 alone).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager, get_task_dict
from tqdm import tqdm

from dbrx_jax import chat, sharding, state
from dbrx_jax import generate as gen
from dbrx_jax.evaluation import TASKS_DIR, scoring
from dbrx_jax.io import files
from dbrx_jax.tokenizer import DBRX_SPECIAL_IDS, DbrxTokenizer, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


@register_model("dbrx_jax")
class DbrxLM(TemplateLM):
    """A DBRX checkpoint as an lm-eval model.

    pretrained: our export or an HF directory (with `adapters`: the base).
    adapters: a LoRA run's workdir: its adapters on `pretrained`.
    tokenizer: `dbrx`, `hf:<dir>` or a sentencepiece model; by default the checkpoint's.
    batch_size: requests per forward ("auto" means 16: shapes are fixed, memory is not probed).
    max_length: the context window; by default the model's max_seq_len (as the hf backend).
    mesh: devices to shard the model over, e.g. "tensor=8"; by default one device.
    dtype: the compute dtype; by default the checkpoint's.
    seed: for sampled generation.
    """

    def __init__(
        self,
        pretrained: str,
        adapters: str = "",
        tokenizer: str = "",
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        mesh: str = "",
        dtype: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,  # lm-eval passes these two to every backend
        device: str | None = None,
    ):
        super().__init__()
        # The arguments first: a typo costs no model load.
        self.batch_size = (
            16 if batch_size in ("auto", None) else _positive(batch_size, "batch_size")
        )
        max_length = None if max_length in (None, "") else _positive(max_length, "max_length")
        self.max_gen_toks = _positive(max_gen_toks, "max_gen_toks")
        if device not in (None, "", "cpu", "cuda", "tpu", "gpu"):
            log.info("device=%r ignored: JAX places the model on its default backend", device)
        overrides = {"dtype": dtype} if dtype else {}
        device_mesh = sharding.make_mesh(sharding.parse_mesh(mesh)) if mesh else None
        self.model, tok = state.load_for_inference(
            pretrained, adapters, tokenizer, device_mesh, **overrides
        )
        if tok is None:
            raise ValueError(
                f"{pretrained}: no tokenizer found for this checkpoint: pass tokenizer=dbrx, "
                "hf:<dir> or a sentencepiece model"
            )
        self.tok: Tokenizer = tok
        self.pretrained = pretrained
        self.max_length = max_length or self.model.config.max_seq_len
        self.seed = int(seed)
        # Rows stop where the HF export's generation_config.json says (the config's eos ids);
        # a config without them stops at the tokenizer's.
        eos = self.model.config.eos_token_id
        self.stop_ids = (
            tuple(eos) if isinstance(eos, tuple) else (eos,) if eos is not None else tok.stop_ids
        )
        self._generations = 0
        self.show_progress = jax.process_index() == 0

    # -- tokens -------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id  # DBRX's bos is its eos, <|endoftext|>

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Text to ids as the HF tokenizer reads it: special-token text is the special token
        (chat templates), and no BOS is added (DBRX has none to add)."""
        if isinstance(self.tok, DbrxTokenizer):
            return self.tok.encode(string, allow_special=True)
        return self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Ids to text without special tokens (the hf backend's skip_special_tokens=True)."""
        if isinstance(self.tok, DbrxTokenizer):
            ids = [i for i in ids if i not in DBRX_SPECIAL_IDS]
        return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__ + ":" + str(getattr(self.tok, "path", "dbrx"))

    def chat_template(self, chat_template: bool | str = False) -> str:
        return chat.chat_template()

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """DBRX-instruct's ChatML (chat.py). Without the generation prompt, the last message is
        left open to be continued (no <|im_end|> after it), as transformers'
        continue_final_message."""
        text = chat.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history:
            return text
        last = str(chat_history[-1]["content"]).strip()
        return text[: text.rindex(last) + len(last)]

    # -- requests -----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        with self._progress(len(pairs), "loglikelihood", disable_tqdm) as bar:
            answers = scoring.score(
                self.model,
                pairs,
                max_length=self.max_length,
                batch_size=self.batch_size,
                on_batch=bar.update,
            )
        for (cache_key, _, _), answer in zip(requests, answers, strict=True):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """As TemplateLM's, except that an empty context and continuation scores (0.0, True)
        instead of failing inside the tokenizing."""
        rest = [r for r in requests if r.args != ("", "")]
        answers = iter(super().loglikelihood(rest, disable_tqdm=disable_tqdm) if rest else [])
        return [(0.0, True) if r.args == ("", "") else next(answers) for r in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over lm-eval's disjoint rolling windows (the first
        token conditioned on the prefix token), all texts' windows batched together."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, *window))
                owners.append(index)
        answers = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = np.zeros(len(requests))
        for index, (logprob, _) in zip(owners, answers, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with equal generation arguments, longest prompt first."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        with self._progress(len(requests), "generate_until", disable_tqdm) as bar:
            for indices in groups.values():
                kwargs = requests[indices[0]].args[1]
                contexts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
                indices = sorted(indices, key=lambda i: (-len(contexts[i]), i))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self._generate([contexts[i] for i in batch], kwargs)
                    for i, text in zip(batch, texts, strict=True):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results

    def _generate(self, prompts: list[list[int]], gen_kwargs: dict) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text())
        max_gen_toks = kwargs.pop("max_gen_toks")
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(
                f"generation kwargs {unknown}: not supported by the dbrx_jax backend (it takes "
                f"until, max_gen_toks and {', '.join(SAMPLING_KWARGS)})"
            )
        if max_gen_toks >= self.max_length:
            raise ValueError(
                f"max_gen_toks={max_gen_toks}: expected fewer than max_length={self.max_length}"
            )
        sampling = (
            gen.Sampling(
                float(kwargs.get("temperature", 1.0)) or 1.0,
                int(kwargs.get("top_k") or 0),
                float(kwargs.get("top_p") or 1.0),
            )
            if kwargs.get("do_sample")
            else gen.Sampling()
        )
        max_prompt = self.max_length - max_gen_toks
        prompts = [p[-max_prompt:] for p in prompts]
        padded = prompts + [prompts[0]] * (self.batch_size - len(prompts))  # one batch shape
        self._generations += 1
        out = gen.generate(
            self.model,
            padded,
            max_new_tokens=max_gen_toks,
            key=jax.random.key(self.seed + self._generations) if sampling.temperature else None,
            sampling=sampling,
            stop_ids=self.stop_ids + self._tokens_containing(tuple(until)),
            vocab_limit=self.tok.vocab_size,
            pad_id=self.tok.pad_id,
        )
        tokens_BX, lengths_B = jax.device_get((out.tokens_BX, out.lengths_B))
        return [
            postprocess_generated_text(
                self.tok_decode(tokens_BX[row, : lengths_B[row]].tolist()), until, None
            )
            for row in range(len(prompts))
        ]

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one backend per evaluation)
    def _tokens_containing(self, until: tuple[str, ...]) -> tuple[int, ...]:
        """Ids whose text holds a whole `until` string: a row that emits one has its stop string
        and can stop there (the text is cut at the string anyway; a string split over tokens is
        still found in the text, only later). As the hf backend's stopping criteria, this ends
        generation early without changing any answer."""
        strings = [u for u in until if u and u != self._eos_text()]
        if not strings:
            return ()
        ids = []
        for i in range(self.tok.vocab_size):
            text = self.tok_decode([i])
            if any(u in text for u in strings):
                ids.append(i)
        return tuple(ids)

    def _eos_text(self) -> str:
        return self.tok.decode([self.tok.eos_id])  # "<|endoftext|>" for DBRX

    def _progress(self, total: int, what: str, disable: bool):
        return tqdm(total=total, desc=f"{what} requests", disable=disable or not self.show_progress)

    def get_model_info(self) -> dict:
        config = self.model.config
        return {
            "model_num_parameters": config.num_params(),
            "model_dtype": config.dtype,
            "model_checkpoint": self.pretrained,
        }


def _positive(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return number


def task_manager(tasks: Sequence[str], include_path: Sequence[str] = ()) -> TaskManager:
    """lm-eval's task index over our task set (evaluation/tasks) and `include_path`; lm-eval's
    own thousands of tasks are indexed too (seconds) only when a name is not found there. A
    name found nowhere is a one-line error, raised before any model is loaded."""
    paths = [TASKS_DIR, *include_path]
    for path in include_path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--include_path={path}: no such directory of task YAMLs")
    manager = TaskManager(include_path=paths, include_defaults=False)
    if set(manager.match_tasks(list(tasks))) != set(tasks):
        log.info("tasks %s: not in %s; indexing lm-eval's own tasks too", list(tasks), paths)
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"--tasks: no task or group named {', '.join(map(repr, unknown))} (in lm-eval or "
            f"{', '.join(paths)}); add its folder with --include_path"
        )
    return manager


def evaluate(lm: DbrxLM, tasks: Sequence[str], manager: TaskManager, **options) -> dict:
    """lm-eval's `simple_evaluate` on `lm`: `options` are its keyword arguments (num_fewshot,
    limit, apply_chat_template, gen_kwargs, log_samples, ...). Returns lm-eval's results dict."""
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, **options)


def write_results(results: dict, path: str) -> None:
    """The results as JSON, written whole or not at all (process 0 only)."""
    if jax.process_index() == 0:
        files.write_json(path, results, default=lm_utils.handle_non_serializable)


def make_table(results: dict) -> str:
    """lm-eval's metrics table, then its groups table when there are groups."""
    table = lm_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_utils.make_table(results, "groups")
    return table


def task_requests(tasks: Sequence[str], manager: TaskManager, limit: int | None = None):
    """The requests lm-eval would send for `tasks` (each task's first `limit` docs, zero-shot
    unless the task sets otherwise): {request type: [Instance]}, for timing or comparing
    backends on exactly the same input."""
    requests: dict[str, list] = {}
    for task in _leaf_tasks(get_task_dict(list(tasks), manager)):
        task.build_all_requests(limit=limit)
        for instance in task.instances:
            requests.setdefault(instance.request_type, []).append(instance)
    return requests


def _leaf_tasks(task_dict: dict):
    for value in task_dict.values():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield value
