"""Sampling parameters and the shared sampling rules, in numpy; the backends follow these exactly.

Order, as in HF transformers' logits warpers: divide the logits by the temperature, then top-k,
then top-p, then min-p; sample from the softmax of what is left.
Temperature 0 means greedy (argmax; ties go to the lowest id). Filters work on the last axis and
mark removed tokens with -inf, so they compose and apply to a batch [..., V] as well.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_p 1.0, top_k 0 and min_p 0.0 disable their filter; the repetition
    controls (`common.penalties`) are off at repetition_penalty 1 and frequency / presence penalty 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid sampling parameter '{name}': {msg}, got {getattr(self, name)!r}")

        def is_int(x: object) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

        need(
            is_num(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be a finite number >= 0",
        )
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an int >= 0 (0 disables)")
        need(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(self.seed is None or (is_int(self.seed) and self.seed >= 0), "seed", "must be None or an int >= 0")
        need(is_num(self.repetition_penalty) and 0 < self.repetition_penalty <= 100, "repetition_penalty",
             "must be in (0, 100] (1 disables)")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(is_num(value) and -2 <= value <= 2, name, "must be in [-2, 2] (0 disables)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_rng(params: SamplingParams) -> np.random.Generator:
    """The generator a numpy sampler uses: seeded from params.seed (fresh entropy when None)."""
    return np.random.default_rng(params.seed)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64; -inf entries get probability 0."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep tokens whose logit is >= the k-th largest (ties at the boundary all stay); k 0 = off."""
    logits = np.asarray(logits)
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1 : k]  # [..., 1]
    return np.where(logits >= kth, logits, -np.inf)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter as in Llama's `sample_top_p`: sort descending, drop a token when the mass
    strictly before it exceeds p (cumsum - p_i > p); the most likely token always stays.

    Sorting is stable, so among equal probabilities the lower id counts as more likely.
    """
    logits = np.asarray(logits)
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")  # [..., V] ids, most likely first
    sorted_probs = np.take_along_axis(probs, order, axis=-1)  # [..., V]
    drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs > p
    drop_sorted[..., 0] = False
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)  # back to id order, [..., V]
    return np.where(drop, -np.inf, logits)


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top probability; 0 = off."""
    logits = np.asarray(logits)
    if min_p <= 0:
        return logits
    probs = softmax(logits)
    keep = probs >= min_p * np.max(probs, axis=-1, keepdims=True)
    return np.where(keep, logits, -np.inf)


def filter_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature-scaled, filtered logits (float64, -inf where removed) for a non-greedy sample."""
    x = np.asarray(logits, dtype=np.float64) / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


def sample_numpy(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits [V]: argmax when temperature is 0, else a draw from the filtered
    distribution by inverting its CDF at one uniform number from `rng`."""
    logits = np.asarray(logits)
    if logits.ndim != 1:
        raise ValueError(f"sample_numpy expects logits of shape [V], got {logits.shape}")
    return sample_with_uniform(logits, params, 0.0 if params.greedy else rng.random())


def sample_with_uniform(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """The reference draw the backends' batched samplers follow: the first id whose cumulative filtered
    probability (in id order) exceeds u times the total; argmax when greedy."""
    logits = np.asarray(logits)
    if params.greedy:
        return int(np.argmax(logits))
    probs = softmax(filter_logits(logits, params))
    kept = np.flatnonzero(probs)  # ids still possible, ascending
    cdf = np.cumsum(probs[kept])
    i = np.searchsorted(cdf, u * cdf[-1], side="right")
    return int(kept[min(int(i), len(kept) - 1)])


_MASK64 = (1 << 64) - 1
_ENTROPY = np.random.default_rng()


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit ints whose outputs look independent."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, index: int) -> float:
    """The uniform number in [0, 1) of draw `index` of a row seeded with `seed`: a pure function of
    both, so a row samples the same tokens alone, in any batch, on either backend."""
    return (_mix64(_mix64(seed & _MASK64) ^ index) >> 11) * 2.0**-53


def agreed(model: Any, params: SamplingParams) -> SamplingParams:
    """`params`, with a seed that every rank of the model's tensor-parallel world shares where none
    was given (the ranks then draw the same numbers and sample the same tokens)."""
    world = getattr(model, "world", None)
    if world is None or params.seed is not None or params.greedy:
        return params
    return dataclasses.replace(params, seed=world.agree_seed())


class RowRandom:
    """The uniform numbers of one generated sequence: seeded (reproducible) or from fresh entropy."""

    def __init__(self, seed: int | None) -> None:
        self.seed, self.index = seed, 0

    def next(self) -> float:
        u = _ENTROPY.random() if self.seed is None else seeded_uniform(self.seed, self.index)
        self.index += 1
        return u


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters as arrays [B], for batched samplers on the device."""

    temperature: np.ndarray  # float32, 1 where greedy (the division is then harmless)
    greedy: np.ndarray  # bool
    top_k: np.ndarray  # int64, 0 = off
    top_p: np.ndarray  # float32, 1 = off
    min_p: np.ndarray  # float32, 0 = off

    @classmethod
    def of(cls, params: list[SamplingParams]) -> SamplingBatch:
        greedy = np.array([p.greedy for p in params], dtype=bool)
        return cls(temperature=np.array([1.0 if p.greedy else p.temperature for p in params], dtype=np.float32),
                   greedy=greedy, top_k=np.array([p.top_k for p in params], dtype=np.int64),
                   top_p=np.array([p.top_p for p in params], dtype=np.float32),
                   min_p=np.array([p.min_p for p in params], dtype=np.float32))

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all())

    def uses(self, name: str) -> bool:
        """Whether any sampled row turns the filter `name` (top_k, top_p, min_p) on."""
        values = getattr(self, name)[~self.greedy]
        return bool((values > 0).any() if name != "top_p" else (values < 1).any())
