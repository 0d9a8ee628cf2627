"""Generation: prefill, then a KV-cached decode loop, all of it in one jitted program.

The prompts of a batch are left-padded to one length (padding is segment 0: masked out of
attention, and every prompt starts at position 0). Prefill and every decode step are the model's
one forward pass with a `KVCache` (model/dbrx.py). After the prefill, a `lax.while_loop` emits
one token per step for every row until each row has produced a stop token or `max_new_tokens`;
no Python runs per token (an optional `on_token` host callback lets a console print the text as
it comes). Sampling: greedy (temperature 0), or temperature with top-k and/or top-p, from an
explicit PRNG key. Vocabulary rows at or past `vocab_limit` (DBRX pads 100,280 ids to 100,352
rows) are never produced. A model built for a mesh generates on it, weights and cache sharded.

Shape letters as in dbrx_jax/model/__init__.py (X: new tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dbrx_jax import chat
from dbrx_jax.config import DbrxConfig
from dbrx_jax.model import Dbrx, KVCache
from dbrx_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off. Each value is
    checked here (NaN and infinities too); top_k against the vocabulary by `check_request`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        finite = _is_number(t) and math.isfinite(t)
        _need(finite and t >= 0, "temperature", t, "a finite number >= 0 (0: greedy)")
        _need(_is_int(k) and k >= 0, "top_k", k, "an int >= 0 (0: off)")
        _need(_is_number(p) and 0 < p <= 1, "top_p", p, "a number in (0, 1] (1.0: off)")


def _need(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={reprlib.repr(value)}: expected {expected}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _is_sequence(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim >= 1
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def check_request(
    config: DbrxConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    vocab_limit: int | None = None,
    *,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> None:
    """Checks the arguments of `generate` against the model's config before anything is
    compiled: a ValueError names the argument (as experiments/generate.py's flags do) and what
    was expected, so that no request is answered with nonsense.

    Token ids (prompts and stop ids) are ints in [0, vocab), vocab being `vocab_limit` (the
    tokenizer's ids) if given, else `config.vocab_size`; `pad_id` indexes the embedding. The
    longest prompt plus `max_new_tokens` fits in `config.max_seq_len`, the context the model
    was built for (to go past it on purpose, load the model with a larger `max_seq_len`)."""
    _need(
        vocab_limit is None or (_is_int(vocab_limit) and 1 <= vocab_limit <= config.vocab_size),
        "vocab_limit",
        vocab_limit,
        f"None or an int in [1, {config.vocab_size}] (the model's vocab_size)",
    )
    vocab = config.vocab_size if vocab_limit is None else vocab_limit
    bound = "vocab_limit" if vocab_limit is not None else "the model's vocab_size"
    ids = f"a token id, an int in [0, {vocab}) ({bound})"
    _check_prompts(prompts)
    for row, prompt in enumerate(prompts):
        for position, token in enumerate(prompt):
            _need(
                _is_int(token) and 0 <= token < vocab, f"prompt_ids[{row}][{position}]", token, ids
            )
    _need(
        _is_int(max_new_tokens) and max_new_tokens > 0,
        "max_new_tokens",
        max_new_tokens,
        "a positive int",
    )
    longest = max(range(len(prompts)), key=lambda row: len(prompts[row]))
    T, limit = len(prompts[longest]), config.max_seq_len
    if T >= limit:
        raise ValueError(
            f"prompt_ids[{longest}] has {T} tokens: expected at most {limit - 1} (the model's "
            f"max_seq_len={limit}, less one new token); shorten the prompt"
        )
    if T + max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}: expected at most {limit - T}, so that the longest "
            f"prompt (prompt_ids[{longest}], {T} tokens) plus the new tokens fit in the model's "
            f"max_seq_len={limit}; lower max_new_tokens (or shorten the prompt)"
        )
    _need(isinstance(sampling, Sampling), "sampling", sampling, "a generate.Sampling")
    _need(
        sampling.top_k <= vocab,
        "top_k",
        sampling.top_k,
        f"an int in [0, {vocab}] ({bound}; 0: off)",
    )
    _need(_is_sequence(stop_ids), "stop_ids", stop_ids, "a sequence of token ids (possibly empty)")
    for i, token in enumerate(stop_ids):
        _need(_is_int(token) and 0 <= token < vocab, f"stop_ids[{i}]", token, ids)
    _need(
        _is_int(pad_id) and 0 <= pad_id < config.vocab_size,
        "pad_id",
        pad_id,
        f"an int in [0, {config.vocab_size}) (the model's vocab_size)",
    )


def _check_prompts(prompts) -> None:
    """A non-empty sequence of non-empty sequences (what each id is, check_request checks)."""
    _need(
        _is_sequence(prompts) and len(prompts) > 0,
        "prompt_ids",
        prompts,
        "at least one prompt, a list of lists of token ids",
    )
    for row, prompt in enumerate(prompts):
        _need(
            _is_sequence(prompt) and len(prompt) > 0,
            f"prompt_ids[{row}]",
            prompt,
            "a prompt of at least one token id (a list of ints)",
        )


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
    """tokens_BX: the new tokens per row, stop token included, then `pad_id`.
    lengths_B: how many of them are real (the stop token counts)."""

    tokens_BX: jax.Array
    lengths_B: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8):
    """tokens [B, T] and segment ids [B, T] (1 for the prompt, 0 for padding) with every prompt
    flush right; T is rounded up to a multiple of `multiple` so that nearby lengths share a
    compiled program."""
    _check_prompts(prompts)
    T = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), T), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), T), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, T - len(prompt) :] = prompt
        segment_ids[row, T - len(prompt) :] = 1
    return tokens, segment_ids


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

    on_token(tokens_B, alive_B): called on the host with every step's tokens (streaming).
    Every argument is checked first (`check_request`)."""
    check_request(
        model.config,
        prompts,
        max_new_tokens,
        sampling,
        vocab_limit,
        stop_ids=stop_ids,
        pad_id=pad_id,
    )
    tokens, segment_ids = left_pad(prompts, pad_id)
    key = jax.random.key(0) if key is None else key
    graphdef, state = nnx.split(model)
    run = _compiled(
        graphdef, max_new_tokens, sampling, tuple(stop_ids), vocab_limit, pad_id, on_token
    )
    return run(state, jnp.asarray(tokens), jnp.asarray(segment_ids), key)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens, sampling, stop_ids, vocab_limit, pad_id, on_token):
    stop_ids = jnp.asarray(stop_ids or (-1,), jnp.int32)

    @jax.jit
    def run(state, tokens_BT, segment_ids_BT, key):
        model = nnx.merge(graphdef, state)
        B, T = tokens_BT.shape
        cache = KVCache.zeros(model.config, B, T + max_new_tokens)
        out = model(tokens_BT, segment_ids_BT=segment_ids_BT, cache=cache, last_only=True)
        key, first_key = jax.random.split(key)
        token_B = sample(out.logits[:, 0], first_key, sampling, vocab_limit)
        out_BX = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
        done_B = jnp.isin(token_B, stop_ids)
        _emit(on_token, token_B, jnp.ones_like(done_B))

        def cond(carry):
            step, _, _, _, done_B, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            step, out_BX, cache, token_B, done_B, key = carry
            out = model(token_B[:, None], cache=cache, last_only=True)
            key, step_key = jax.random.split(key)
            new_B = sample(out.logits[:, 0], step_key, sampling, vocab_limit)
            new_B = jnp.where(done_B, pad_id, new_B)
            _emit(on_token, new_B, ~done_B)
            out_BX = jax.lax.dynamic_update_index_in_dim(out_BX, new_B, step, axis=1)
            done_B = done_B | jnp.isin(new_B, stop_ids)
            return step + 1, out_BX, out.cache, new_B, done_B, key

        carry = (jnp.ones((), jnp.int32), out_BX, out.cache, token_B, done_B, key)
        _, out_BX, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
        is_stop_BX = jnp.isin(out_BX, stop_ids)
        first_stop_B = jnp.where(
            is_stop_BX.any(1), jnp.argmax(is_stop_BX, axis=1) + 1, max_new_tokens
        )
        return Generated(tokens_BX=out_BX, lengths_B=first_stop_B.astype(jnp.int32))

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


def text_streamer(tokenizer: Tokenizer, write: Callable[[str], object]):
    """An `on_token` callback that writes the first row's text as it is generated. It decodes
    the whole continuation each time and holds back a character whose bytes are still coming
    (a byte-level BPE splits rare characters over several tokens)."""
    streamed: list[int] = []
    shown = [0]  # characters written so far

    def on_token(tokens_B: np.ndarray, alive_B: np.ndarray) -> None:
        if not alive_B[0]:
            return
        streamed.append(int(tokens_B[0]))
        text = tokenizer.decode(streamed)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next token
            return
        write(text[shown[0] :])
        shown[0] = len(text)

    return on_token


def sample_text(
    model: Dbrx, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int
) -> dict[str, str]:
    """Greedy continuations of text prompts (how a model writes after training)."""
    out = generate(
        model,
        [tokenizer.encode(p) for p in prompts],
        max_new_tokens=max_new_tokens,
        stop_ids=tokenizer.stop_ids,
        vocab_limit=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
    )
    tokens, lengths = jax.device_get((out.tokens_BX, out.lengths_B))
    return {
        p: tokenizer.decode(row[:n]) for p, row, n in zip(prompts, tokens, lengths, strict=True)
    }


def chat_replies(
    model: Dbrx, tokenizer: Tokenizer, max_new_tokens: int = 96
) -> Callable[[list[list[dict]]], list[str]]:
    """A function from conversations to the model's replies (sft.score_references'
    `generate_fn`): the model's greedy replies, each prompt rendered
    as generation renders it (chat.chat_ids), a reply cut at <|im_end|> (its token, or its text
    for a tokenizer without one)."""
    end = [tokenizer.token_id("<|im_end|>")] if chat.has_markers(tokenizer) else []

    def replies(conversations: list[list[dict]]) -> list[str]:
        prompts = [chat.chat_ids(tokenizer, messages) for messages in conversations]
        out = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            stop_ids=(*end, *tokenizer.stop_ids),
            vocab_limit=tokenizer.vocab_size,
            pad_id=tokenizer.pad_id,
        )
        tokens, lengths = jax.device_get((out.tokens_BX, out.lengths_B))
        texts = [
            tokenizer.decode([t for t in row[:n] if t not in end])
            for row, n in zip(tokens, lengths, strict=True)
        ]
        return [text.split("<|im_end|>")[0] for text in texts]

    return replies
