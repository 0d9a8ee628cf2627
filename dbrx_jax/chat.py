r"""DBRX-instruct's chat format: ChatML with its default system message.

<|im_start|>{role}\n{content}<|im_end|>   turns joined by "\n", then
\n<|im_start|>assistant\n                 to prompt the reply.
"""

from __future__ import annotations

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


def chat_ids(
    tokenizer: Tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = True,
    system: str | None = DEFAULT_SYSTEM_MESSAGE,
) -> list[int]:
    """Token ids of `render_chat`'s text, with the turn markers as their special tokens and the
    contents as plain text (a message cannot smuggle in <|im_end|>)."""
    start, end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    for i, (role, content) in enumerate(chat_turns(messages, system)):
        if i:
            ids += newline
        ids += [start, *tokenizer.encode(f"{role}\n{content}"), end]
    if add_generation_prompt:
        ids += [*newline, start, *tokenizer.encode("assistant\n")]
    return ids
