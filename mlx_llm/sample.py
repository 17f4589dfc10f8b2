"""Batched sampling: each row with its own parameters and its own uniform number, following
`common.sampling.sample_with_uniform` (temperature, then top-k, top-p, min-p, then the inverse CDF
in id order). Shapes: B rows, V vocabulary, n alternatives."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from common.penalties import PenaltyBatch
from common.sampling import SamplingBatch


def apply_penalties(logits: mx.array, penalties: PenaltyBatch | None) -> mx.array:
    """The repetition controls on logits [B, V] (`common.penalties`); a penalized copy."""
    if penalties is None:
        return logits
    rows, tokens = mx.array(penalties.rows), mx.array(penalties.tokens)
    x = logits[rows, tokens]  # [n]
    divide = mx.array(penalties.divide)
    x = mx.where(x < 0, x * divide, x / divide) - mx.array(penalties.subtract)
    out = mx.array(logits)
    out[rows, tokens] = x
    return out


def sample_rows(logits: mx.array, rows: SamplingBatch, uniforms: np.ndarray,
                penalties: PenaltyBatch | None = None) -> mx.array:
    """Token ids [B] from float32 logits [B, V] (after the repetition controls, greedy rows too),
    lazily (nothing is evaluated here)."""
    logits = apply_penalties(logits, penalties)
    greedy = mx.argmax(logits, axis=-1)  # [B]; ties go to the lowest id
    if rows.all_greedy:
        return greedy
    V = logits.shape[-1]
    x = logits / mx.array(rows.temperature)[:, None]
    if rows.uses("top_k"):
        k = mx.array(rows.top_k)  # [B]
        ordered = -mx.sort(-x, axis=-1)  # [B, V] descending
        kth = mx.take_along_axis(ordered, mx.clip(k - 1, 0, V - 1)[:, None], axis=-1)  # [B, 1]
        x = mx.where((x < kth) & (k > 0)[:, None], -mx.inf, x)  # ties at the k-th all stay
    probs = mx.softmax(x, axis=-1)
    if rows.uses("top_p"):
        top_p = mx.array(rows.top_p)[:, None]  # [B, 1]
        order = mx.argsort(-probs, axis=-1)  # [B, V] descending
        sorted_p = mx.take_along_axis(probs, order, axis=-1)
        # Drop a token once the mass before it already exceeds p (the reference's rule); p = 1 keeps all.
        drop = ((mx.cumsum(sorted_p, axis=-1) - sorted_p) > top_p) & (top_p < 1)
        probs = mx.put_along_axis(probs, order, mx.where(drop, 0.0, sorted_p), axis=-1)
    if rows.uses("min_p"):
        min_p = mx.array(rows.min_p)[:, None]  # [B, 1]
        probs = mx.where(probs < min_p * mx.max(probs, axis=-1, keepdims=True), 0.0, probs)
    cdf = mx.cumsum(probs, axis=-1)  # [B, V]
    target = mx.array(uniforms.astype(np.float32))[:, None] * cdf[:, -1:]
    picked = mx.sum(cdf <= target, axis=-1)  # [B] first id whose cumulative mass exceeds the target
    last_kept = mx.max(mx.where(probs > 0, mx.arange(V), -1), axis=-1)  # rounding can overshoot the last kept id
    sampled = mx.minimum(picked, last_kept)
    return mx.where(mx.array(rows.greedy), greedy, sampled)


def token_logprobs(logits: mx.array, tokens: mx.array, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's log-probabilities (log-softmax of the raw logits [B, V]): of `tokens` [B], and the n
    most likely ids and their values [B, n], as host arrays."""
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)  # [B, V]
    chosen = mx.take_along_axis(logp, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]  # [B]
    n = min(n, logp.shape[-1])
    top_ids = mx.argsort(-logp, axis=-1)[:, :n]  # [B, n]; a stable sort keeps the lower id first on ties
    top_vals = mx.take_along_axis(logp, top_ids, axis=-1)
    return np.array(chosen), np.array(top_ids), np.array(top_vals)
