"""Generation: prefill, then a KV-cached decode loop, all of it in one jitted program.

The prompts of a batch are left-padded to one length (padding is masked out of attention and
its positions do not count: every prompt starts at position 0). After the prefill, a
`lax.while_loop` emits one token per step for every row until each row has produced a stop
token or `max_new_tokens`; no Python runs per token (an optional `on_token` host callback lets
a console print the text as it comes). Sampling: greedy (temperature 0), or temperature with
top-k and/or top-p, from an explicit PRNG key. Vocabulary rows at or past `vocab_limit` (DBRX
pads 100,280 ids to 100,352 rows) are never produced.

Also here: DBRX-instruct's chat format (ChatML with its default system message).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dbrx_jax.model import Dbrx, KVCache, positions_from_segments

DBRX_STOP_IDS = (100257, 100279)  # <|endoftext|>, <|im_end|>


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{self}: expected temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def sample(
    logits_BV: jax.Array, key: jax.Array, sampling: Sampling, vocab_limit: int | None = None
) -> jax.Array:
    """One token per row from fp32 logits."""
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    if vocab_limit is not None and vocab_limit < V:  # padding rows of the embedding
        logits_BV = jnp.where(jnp.arange(V) < vocab_limit, logits_BV, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest set whose probability reaches top_p (the first token always).
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < sampling.top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@struct.dataclass
class Generated:
    """tokens_BN: the new tokens per row, stop token included, then `pad_id`.
    lengths_B: how many of them are real (the stop token counts)."""

    tokens_BN: jax.Array
    lengths_B: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8):
    """tokens [B, P] and valid [B, P] with every prompt flush right; P is rounded up to a
    multiple of `multiple` so that nearby lengths share a compiled program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt) :] = prompt
        valid[row, P - len(prompt) :] = True
    return tokens, valid


def generate(
    model: Dbrx,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    vocab_limit: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> Generated:
    """Generates up to `max_new_tokens` for each prompt (lists of token ids).

    on_token(tokens_B, alive_B): called on the host with every step's tokens (streaming)."""
    tokens, valid = left_pad(prompts, pad_id)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    run = _compiled(
        graphdef, max_new_tokens, sampling, tuple(stop_ids), vocab_limit, pad_id, on_token
    )
    return run(state, jnp.asarray(tokens), jnp.asarray(valid), key)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens, sampling, stop_ids, vocab_limit, pad_id, on_token):
    stop_ids = jnp.asarray(stop_ids or (-1,), jnp.int32)

    @jax.jit
    def run(state, tokens_BP, valid_BP, key):
        model = nnx.merge(graphdef, state)
        B, P = tokens_BP.shape
        cache = KVCache.zeros(model.config, B, P + max_new_tokens)
        positions_BP = positions_from_segments(valid_BP.astype(jnp.int32))
        h_BPD, cache = model.extend(tokens_BP, positions_BP, valid_BP, cache)
        key, first_key = jax.random.split(key)
        token_B = sample(model.logits(h_BPD[:, -1:])[:, 0], first_key, sampling, vocab_limit)
        next_position_B = positions_BP[:, -1] + 1
        out_BN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
        done_B = jnp.isin(token_B, stop_ids)
        _emit(on_token, token_B, jnp.ones_like(done_B))

        def cond(carry):
            step, _, _, _, _, done_B, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            step, out_BN, cache, token_B, position_B, done_B, key = carry
            h_B1D, cache = model.extend(
                token_B[:, None], position_B[:, None], jnp.ones((B, 1), bool), cache
            )
            key, step_key = jax.random.split(key)
            new_B = sample(model.logits(h_B1D)[:, 0], step_key, sampling, vocab_limit)
            new_B = jnp.where(done_B, pad_id, new_B)
            _emit(on_token, new_B, ~done_B)
            out_BN = jax.lax.dynamic_update_index_in_dim(out_BN, new_B, step, axis=1)
            done_B = done_B | jnp.isin(new_B, stop_ids)
            return step + 1, out_BN, cache, new_B, position_B + 1, done_B, key

        carry = (jnp.ones((), jnp.int32), out_BN, cache, token_B, next_position_B, done_B, key)
        _, out_BN, _, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
        is_stop_BN = jnp.isin(out_BN, stop_ids)
        first_stop_B = jnp.where(
            is_stop_BN.any(1), jnp.argmax(is_stop_BN, axis=1) + 1, max_new_tokens
        )
        return Generated(tokens_BN=out_BN, lengths_B=first_stop_B.astype(jnp.int32))

    return run


def _emit(on_token, tokens_B, alive_B):
    if on_token is not None:
        jax.experimental.io_callback(
            lambda t, a: on_token(np.asarray(t), np.asarray(a)),
            None,
            tokens_B,
            alive_B,
            ordered=True,
        )


# ---------------------------------------------------------------------------------------------
# DBRX-instruct's chat format.

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
    tokenizer,
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


def find_tokenizer(checkpoint_dir: str, vocab_size: int):
    """The tokenizer that goes with a checkpoint: an HF tokenizer.json beside it, a
    sentencepiece model in it (a training workdir), DBRX's own for a DBRX-sized vocabulary,
    else None (then only token ids can be given)."""
    import glob
    import os

    from dbrx_jax.tokenizer import DbrxTokenizer, SentencePieceTokenizer

    if os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.json")):
        return DbrxTokenizer(checkpoint_dir)
    models = sorted(glob.glob(os.path.join(checkpoint_dir, "*.model")))
    if models:
        return SentencePieceTokenizer(models[0])
    if vocab_size == 100352:
        return DbrxTokenizer()
    return None
