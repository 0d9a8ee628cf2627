"""Log-likelihoods of continuations: the scoring behind the lm-eval backend (harness.py).

A request is a context and a continuation, both token ids. Its answer is the sum of the
continuation's log-probabilities, each given everything before it, and whether greedy decoding
would have produced it (every continuation token is the argmax at its position). A request
longer than the context window loses tokens on the left: the model reads the last
`max_length` tokens of context + continuation, less the final token, as lm-eval's `hf` backend
does. An empty continuation has log-likelihood 0 and is greedy (nothing to predict).

`score` is the fast path. A request's window splits into a prefix (everything before the
first scored position) and a suffix (the K tokens whose next-token logits are scored).
Requests are sorted by length, longest first, with equal prefixes side by side (the choices of
a multiple-choice question), and cut into batches of `batch_size` rows. In a batch each
distinct prefix is read once into a KV cache; every request copies its prefix's cache rows and
reads its suffix after them; the LM head, most of a small model's work over a large vocabulary,
runs only at the N scored positions (`Dbrx(head=False)`, `Dbrx.unembed`). The distinct
prefixes, their length, the suffix length and N are bucketed (powers of two, multiples of 8 and
32), so XLA compiles a handful of programs for any request mix. Padding changes nothing for the
real tokens: prefixes are left-padded into segment 0, suffixes right-padded after them
(attention is causal), and routing is dropless, token by token.

`score_one` is the reference: one request, the full logits, `jax.nn.log_softmax`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbrx_jax.model import Dbrx, KVCache

Answer = tuple[float, bool]  # (log-likelihood, greedy)

MIN_PREFIX_BUCKET = 8  # prefix lengths: powers of two
SUFFIX_MULTIPLE = 8  # suffix lengths: multiples of 8
TARGETS_MULTIPLE = 32  # scored positions in a batch: multiples of 32


def model_window(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """The ids the model reads: context + continuation less its last token, left-truncated to
    `max_length`. The continuation must fit (its first token needs one token before it)."""
    if len(continuation) > max_length:
        raise ValueError(
            f"continuation of {len(continuation)} tokens: expected at most max_length="
            f"{max_length} (the model's context window)"
        )
    if not context and continuation:
        raise ValueError("empty context: give at least one token (lm-eval gives the prefix token)")
    return [*context, *continuation][-(max_length + 1) :][:-1]


def score_one(
    model: Dbrx, context: Sequence[int], continuation: Sequence[int], max_length: int
) -> Answer:
    """One request, scored plainly: the reference `score` is tested against."""
    if not continuation:
        return 0.0, True
    inputs = model_window(context, continuation, max_length)
    graphdef, params = nnx.split(model)
    logits_TV = _logits(graphdef, params, jnp.asarray([inputs], jnp.int32))[0, -len(continuation) :]
    logprobs_TV = jax.nn.log_softmax(logits_TV.astype(jnp.float32), axis=-1)
    targets_T = jnp.asarray(continuation)
    logprob = jnp.take_along_axis(logprobs_TV, targets_T[:, None], axis=-1).sum()
    greedy = jnp.all(jnp.argmax(logprobs_TV, axis=-1) == targets_T)
    return float(logprob), bool(greedy)


def bucket(n: int, minimum: int, cap: int) -> int:
    """The smallest power of two >= n (and >= minimum), capped at `cap`."""
    return min(max(minimum, 1 << max(n - 1, 0).bit_length()), cap)


def round_up(n: int, multiple: int, cap: int) -> int:
    return min(max(multiple, -(-n // multiple) * multiple), cap)


@dataclasses.dataclass(frozen=True)
class _Window:
    """One request as the model reads it: the prefix (read once per batch for every request
    that shares it) and the suffix, whose K positions predict the continuation."""

    index: int
    prefix: tuple[int, ...]
    suffix: list[int]
    continuation: list[int]


def score(
    model: Dbrx,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int = 16,
    on_batch=None,
) -> list[Answer]:
    """(log-likelihood, greedy) of each (context, continuation) pair, in the given order.

    on_batch(n): called after each batch with its number of real requests (progress bars)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive int")
    answers: list[Answer | None] = [None] * len(requests)
    windows = []
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            answers[i] = (0.0, True)
            continue
        inputs = model_window(context, continuation, max_length)
        cut = len(inputs) - len(continuation)
        windows.append(_Window(i, tuple(inputs[:cut]), inputs[cut:], list(continuation)))
    # Longest first; requests with the same prefix side by side, so that they share a batch.
    windows.sort(key=lambda w: (-len(w.prefix) - len(w.suffix), w.prefix, -len(w.suffix), w.index))
    graphdef, params = nnx.split(model)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        arrays = _batch_arrays(batch, batch_size, max_length)
        logprob_B, greedy_B = jax.device_get(_score_batch(graphdef, params, *arrays))
        for row, window in enumerate(batch):
            answers[window.index] = (float(logprob_B[row]), bool(greedy_B[row]))
        if on_batch is not None:
            on_batch(len(batch))
    return answers


def _batch_arrays(batch: list[_Window], batch_size: int, max_length: int) -> list[np.ndarray]:
    """The batch's distinct prefixes, left-padded: tokens [C, P] and their segment ids (0 for
    padding); each request's prefix row [B] and suffix tokens [B, K], right-padded; and the N
    scored positions: flat indices into [B, K], their targets and which are real. C, P, K and N
    are bucketed; B is `batch_size` (empty rows read prefix row 0 and score nothing)."""
    prefixes = list(dict.fromkeys(w.prefix for w in batch))
    C = bucket(len(prefixes), 1, batch_size)
    P = bucket(max(len(p) for p in prefixes), MIN_PREFIX_BUCKET, max_length)
    K = round_up(max(len(w.suffix) for w in batch), SUFFIX_MULTIPLE, max_length)
    N = round_up(sum(len(w.suffix) for w in batch), TARGETS_MULTIPLE, batch_size * K)
    prefix_CP = np.zeros((C, P), np.int32)
    prefix_segments_CP = np.zeros((C, P), np.int32)
    for row, prefix in enumerate(prefixes):
        if prefix:
            prefix_CP[row, P - len(prefix) :] = prefix
            prefix_segments_CP[row, P - len(prefix) :] = 1
    row_of_prefix = {prefix: row for row, prefix in enumerate(prefixes)}
    prefix_row_B = np.zeros(batch_size, np.int32)
    suffix_BK = np.zeros((batch_size, K), np.int32)
    position_N = np.zeros(N, np.int32)
    target_N = np.zeros(N, np.int32)
    valid_N = np.zeros(N, bool)
    n = 0
    for row, window in enumerate(batch):
        length = len(window.suffix)
        prefix_row_B[row] = row_of_prefix[window.prefix]
        suffix_BK[row, :length] = window.suffix
        position_N[n : n + length] = row * K + np.arange(length)
        target_N[n : n + length] = window.continuation
        valid_N[n : n + length] = True
        n += length
    return [prefix_CP, prefix_segments_CP, prefix_row_B, suffix_BK, position_N, target_N, valid_N]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens_BT):
    return nnx.merge(graphdef, params)(tokens_BT).logits


@functools.partial(jax.jit, static_argnums=0)
def _score_batch(
    graphdef,
    params,
    prefix_CP,
    prefix_segments_CP,
    prefix_row_B,
    suffix_BK,
    position_N,
    target_N,
    valid_N,
):
    """1. The distinct prefixes fill a KV cache (their logits are never read).
    2. Each request takes a copy of its prefix's cache rows and reads its suffix after them
       (causal: its right padding is never seen).
    3. The LM head runs at the N scored positions only: log p(target) = logit(target) -
       logsumexp(logits), summed per request; greedy where every target is the argmax."""
    model = nnx.merge(graphdef, params)
    C, P = prefix_CP.shape
    B, K = suffix_BK.shape
    cache = KVCache.zeros(model.config, C, P + K)
    cache = model(prefix_CP, segment_ids_BT=prefix_segments_CP, cache=cache, head=False).cache
    cache = cache.replace(
        k_LBSKH=jnp.take(cache.k_LBSKH, prefix_row_B, axis=1),
        v_LBSKH=jnp.take(cache.v_LBSKH, prefix_row_B, axis=1),
        segment_ids_BS=jnp.take(cache.segment_ids_BS, prefix_row_B, axis=0),
    )
    hidden_BKD = model(
        suffix_BK, segment_ids_BT=jnp.ones_like(suffix_BK), cache=cache, head=False
    ).hidden
    h_ND = hidden_BKD.reshape(B * K, -1)[position_N]
    logits_NV = model.unembed(h_ND[None])[0].astype(jnp.float32)
    logit_N = jnp.take_along_axis(logits_NV, target_N[:, None], axis=-1)[:, 0]
    logprob_N = jnp.where(valid_N, logit_N - jax.nn.logsumexp(logits_NV, axis=-1), 0.0)
    miss_N = valid_N & (jnp.argmax(logits_NV, axis=-1) != target_N)
    row_N = position_N // K
    logprob_B = jnp.zeros(B, jnp.float32).at[row_N].add(logprob_N)
    greedy_B = jnp.zeros(B, jnp.int32).at[row_N].add(miss_N.astype(jnp.int32)) == 0
    return logprob_B, greedy_B
