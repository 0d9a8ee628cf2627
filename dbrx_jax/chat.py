r"""DBRX-instruct's chat format: ChatML with its default system message.

<|im_start|>{role}\n{content}<|im_end|>   turns joined by "\n", then
\n<|im_start|>assistant\n                 to prompt the reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dbrx_jax.tokenizer import Tokenizer

DEFAULT_SYSTEM_MESSAGE = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer "
    "questions based on information available up to that point.\n"
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough "
    "responses to more complex and open-ended questions.\n"
    "You assist with various tasks, from writing to coding (using markdown for code blocks — "
    "remember to use ``` with code, JSON, and tables).\n"
    "(You do not have real-time data access or code execution capabilities. You avoid "
    "stereotyping and provide balanced perspectives on controversial topics. You do not "
    "provide song lyrics, poems, or news articles and do not divulge details of your training "
    "data.)\n"
    "This is your system prompt, guiding your responses. Do not reference it, just respond to "
    "the user. If you find yourself talking about this message, stop. You should be "
    "responding appropriately and usually that means not mentioning this.\n"
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS "
    "DIRECTLY PERTINENT TO THE USER'S QUERY."
)


def chat_turns(
    messages: Sequence[dict], system: str | None = DEFAULT_SYSTEM_MESSAGE
) -> list[tuple[str, str]]:
    """(role, content) turns: the given system message, or `system` if there is none (None:
    no system turn); contents stripped as the release's template does."""
    turns = [(m["role"], str(m["content"]).strip()) for m in messages]
    for role, _ in turns:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"chat role {role!r}: expected system, user or assistant")
    if (not turns or turns[0][0] != "system") and system is not None:
        turns.insert(0, ("system", system.strip()))
    return turns


def render_chat(
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    system: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> str:
    """The ChatML text: `<|im_start|>{role}\\n{content}<|im_end|>` turns joined by newlines,
    then `\\n<|im_start|>assistant\\n` to prompt the reply."""
    text = "\n".join(
        f"<|im_start|>{role}\n{content}<|im_end|>" for role, content in chat_turns(messages, system)
    )
    return text + ("\n<|im_start|>assistant\n" if add_generation_prompt else "")


def chat_template(system: str | None = DEFAULT_SYSTEM_MESSAGE) -> str:
    r"""A Jinja chat template (as transformers' apply_chat_template runs it) rendering what
    `render_chat(messages, add_generation_prompt=..., system=system)` renders:
    `<|im_start|>{role}\n{content}<|im_end|>` turns joined by "\n", contents stripped, the
    `system` message first when the conversation does not start with one (None: none), and
    `\n<|im_start|>assistant\n` for add_generation_prompt."""
    turns = (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{- raise_exception(\"chat role '\" ~ message['role'] ~ "
        '"\': expected system, user or assistant") -}}'
        "{%- endif -%}"
        "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ (message['content'] | string | trim)"
        " ~ '<|im_end|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    if system is None:
        return turns
    # A JSON string is a Jinja string literal of the same text (escapes included).
    default = json.dumps(system.strip(), ensure_ascii=False)
    return (
        "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + default + "}] + messages -%}"
        "{%- endif -%}" + turns
    )


def chat_ids(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    system: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> list[int]:
    """Token ids of `render_chat`'s text, with the turn markers as their special tokens and the
    contents as plain text (a message cannot smuggle in <|im_end|>). A tokenizer without the
    markers encodes them as text (`marker_ids`); a reply then ends at the text <|im_end|>."""
    ids, _ = _chat_ids_and_mask(tokenizer, messages, add_generation_prompt, system)
    return ids


def chat_ids_with_mask(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    system: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[list[int], list[int]]:
    """`chat_ids(..., add_generation_prompt=False)` and a 0/1 mask over those ids that is 1 on
    each assistant turn's content and its closing <|im_end|> (what fine-tuning learns, stopping
    included), 0 on system and user turns, <|im_start|>, role headers and the newlines between
    turns. A token that straddles the header and the content counts as content."""
    return _chat_ids_and_mask(tokenizer, messages, False, system)


def _chat_ids_and_mask(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool,
    system: str | None,
) -> tuple[list[int], list[int]]:
    start, end = marker_ids(tokenizer, "<|im_start|>"), marker_ids(tokenizer, "<|im_end|>")
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for i, (role, content) in enumerate(chat_turns(messages, system)):
        if i:
            ids += newline
            mask += [0] * len(newline)
        turn = tokenizer.encode(f"{role}\n{content}")
        ids += [*start, *turn, *end]
        if role == "assistant":
            header = _common_prefix(turn, tokenizer.encode(f"{role}\n"))
            mask += [0] * (len(start) + header) + [1] * (len(turn) - header + len(end))
        else:
            mask += [0] * (len(start) + len(turn) + len(end))
    if add_generation_prompt:
        prompt = [*newline, *start, *tokenizer.encode("assistant\n")]
        ids += prompt
        mask += [0] * len(prompt)
    return ids, mask


def has_markers(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has the ChatML markers as tokens of their own (dbrx's, an HF
    DBRX tokenizer); a sentencepiece model trained on plain text has not."""
    try:
        tokenizer.token_id("<|im_start|>")
        tokenizer.token_id("<|im_end|>")
    except KeyError:
        return False
    return True


def marker_ids(tokenizer: Tokenizer, marker: str) -> list[int]:
    """A ChatML marker's ids: its own token, or for a tokenizer without one (has_markers) the
    marker's text encoded as text, so that the rendering is the same text either way."""
    try:
        return [tokenizer.token_id(marker)]
    except KeyError:
        return tokenizer.encode(marker)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
