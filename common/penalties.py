"""Repetition controls, applied to a row's logits before sampling (and before greedy's argmax).

- `repetition_penalty` (transformers' and mlx-lm's definition): every token id already in the
  sequence (prompt and generated) has its logit divided by the penalty when positive, multiplied by
  it when negative; 1 is off.
- `frequency_penalty` and `presence_penalty` (OpenAI's): a token's logit loses frequency_penalty
  times the number of times it was generated, and presence_penalty once if it was; 0 is off.

Each row keeps its counts on the host (`PenaltyTracker`); a step's penalties for every row travel to
the device as one flat list of (row, token, divisor, subtrahend) (`PenaltyBatch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.sampling import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1 or params.frequency_penalty != 0 or params.presence_penalty != 0


class PenaltyTracker:
    """One row's token history, as the penalties need it."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int]) -> None:
        self.params = params
        self.seen: dict[int, None] = dict.fromkeys(int(t) for t in prompt) if params.repetition_penalty != 1 else {}
        self.counts: dict[int, int] = {}  # generated tokens only

    def add(self, token: int) -> None:
        if self.params.repetition_penalty != 1:
            self.seen[token] = None
        self.counts[token] = self.counts.get(token, 0) + 1

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids [n], divisor [n], subtrahend [n]) of every token this row penalizes."""
        p = self.params
        ids = np.fromiter(dict.fromkeys([*self.seen, *self.counts]), dtype=np.int64)
        divide = np.where(np.isin(ids, list(self.seen)), p.repetition_penalty, 1.0).astype(np.float32)
        counts = np.array([self.counts.get(int(t), 0) for t in ids], dtype=np.float32)
        subtract = (counts * p.frequency_penalty + (counts > 0) * p.presence_penalty).astype(np.float32)
        return ids, divide, subtract


@dataclass(frozen=True)
class PenaltyBatch:
    """A step's penalties: logit [rows[i], tokens[i]] -> (x / divide[i] if x > 0 else x * divide[i]) - subtract[i]."""

    rows: np.ndarray  # int64 [n]
    tokens: np.ndarray  # int64 [n]
    divide: np.ndarray  # float32 [n]
    subtract: np.ndarray  # float32 [n]

    @classmethod
    def of(cls, trackers: Sequence[PenaltyTracker | None]) -> PenaltyBatch | None:
        """The batch for rows in order (None for a row without penalties); None when no row has any."""
        parts = [(b, *t.entries()) for b, t in enumerate(trackers) if t is not None]
        parts = [p for p in parts if len(p[1])]
        if not parts:
            return None
        return cls(rows=np.concatenate([np.full(len(p[1]), p[0], dtype=np.int64) for p in parts]),
                   tokens=np.concatenate([p[1] for p in parts]), divide=np.concatenate([p[2] for p in parts]),
                   subtract=np.concatenate([p[3] for p in parts]))


def apply_penalties_numpy(logits: np.ndarray, batch: PenaltyBatch | None) -> np.ndarray:
    """The reference the backends follow, on logits [B, V] (a penalized copy)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if batch is None:
        return out
    x = out[batch.rows, batch.tokens]
    x = np.where(x < 0, x * batch.divide, x / batch.divide) - batch.subtract
    out[batch.rows, batch.tokens] = x
    return out
