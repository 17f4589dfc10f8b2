"""Backend-neutral bookkeeping of the per-layer KV caches: each row's offset, the chunk ring's slots,
rewinds and row selection. The backends' caches subclass these and add only their array operations.

A cache holds B rows; row b has absorbed positions 0 .. offsets[b]-1. Rows move independently
(batched generation), or together (one prompt, `offset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.rope import chunk_start
from common.spans import RowSpans, host_ints

EMPTY = 1 << 30  # key position of an empty slot: after every query, so causal masking hides it


class CacheRows:
    """Per-row offsets of one layer's cache."""

    def __init__(self, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.offsets = np.zeros(batch_size, dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """Positions absorbed by each row, int64 [B]."""
        if self._offsets is None:  # rows advanced together since the array was last read
            self._offsets = np.full(self._batch, self._same, dtype=np.int64)
        return self._offsets

    @offsets.setter
    def offsets(self, value: np.ndarray) -> None:
        self._offsets: np.ndarray | None = np.asarray(value, dtype=np.int64)
        self._batch = len(self._offsets)
        first = int(self._offsets[0])
        # The shared offset as a plain int while rows move together: a decode step of one prompt
        # checks and advances it without numpy calls.
        self._same: int | None = first if (self._offsets == first).all() else None

    def advance_together(self, end: int) -> None:
        """Every row now holds positions 0 .. end-1 (the array of offsets is made when next read: a
        decode loop advances every layer's cache each step and rarely reads them)."""
        self._same, self._offsets = end, None

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def offset(self) -> int:
        """The position every row has reached; an error while rows stand at different positions."""
        if self._same is None:
            raise ValueError(f"{type(self).__name__}: rows stand at different positions {self.offsets.tolist()}; "
                             "read `offsets`")
        return self._same

    def check_spans(self, spans: RowSpans) -> None:
        if spans.batch != self.batch_size:
            raise ValueError(f"{type(self).__name__}: built for {self.batch_size} row(s), got {spans.batch}")
        if spans.uniform and self._same is not None:
            if spans.start != self._same:
                raise ValueError(f"TransformerInput.tokens_position {spans.start} must equal the cache offset "
                                 f"{self._same}")
        elif (spans.starts != self.offsets).any():
            raise ValueError(f"TransformerInput.tokens_position {spans.starts.tolist()} must equal the cache "
                             f"offsets {self.offsets.tolist()}")

    def rewind(self, n: int | Sequence[int] | np.ndarray) -> None:
        """Forget the last n positions of every row (an int) or of each row (one count per row)."""
        counts = np.broadcast_to(host_ints(n, f"{type(self).__name__}.rewind"), self.offsets.shape)
        if ((counts < 0) | (counts > self.offsets)).any():
            raise ValueError(f"{type(self).__name__}.rewind: each n must be in [0, offset] "
                             f"(offsets {self.offsets.tolist()}), got {counts.tolist()}")
        self._check_rewind(self.offsets - counts)
        self.offsets = self.offsets - counts

    def _check_rewind(self, new: np.ndarray) -> None:
        """Raise where the cache no longer holds what continuing from `new` needs (every key is kept here)."""

    def can_rewind_to(self, target: int, row: int = 0) -> bool:
        """Whether row `row` could go back to position `target` (see `rewind`)."""
        return 0 <= target <= int(self.offsets[row])

    def row_index(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Validated row numbers, int64 [n]."""
        idx = host_ints(rows, f"{type(self).__name__} rows").reshape(-1)
        if ((idx < 0) | (idx >= self.batch_size)).any():
            raise ValueError(f"{type(self).__name__}: rows must be in [0, {self.batch_size}), got {idx.tolist()}")
        return idx


class GlobalRows(CacheRows):
    """A global (NoPE) layer: slot p holds position p; storage grows in steps of `step` positions."""

    step = 256

    def capacity(self, end: int) -> int:
        """Slots for positions 0 .. end-1, in whole steps, so a decode loop reallocates once per `step`."""
        return -(-end // self.step) * self.step


class RingRows(CacheRows):
    """A chunked RoPE layer: the current attention chunk in `chunk_size` ring slots.

    Chunks align to absolute multiples of C, so position p lives in slot p % C, and a row at offset o
    holds positions chunk_start(o) .. o-1 in slots 0 .. o % C - 1 (none when o is a multiple of C).
    """

    def __init__(self, chunk_size: int, batch_size: int = 1) -> None:
        if chunk_size <= 0:
            raise ValueError(f"{type(self).__name__}: chunk_size must be > 0, got {chunk_size}")
        super().__init__(batch_size)
        self.chunk_size = chunk_size

    def held_positions(self) -> np.ndarray:
        """Absolute position of every slot that the rows' next queries may see, EMPTY elsewhere: [B, C]."""
        C = self.chunk_size
        slots = np.arange(C)[None, :]
        base = (self.offsets // C * C)[:, None]  # [B, 1] chunk start of each row
        return np.where(slots < (self.offsets % C)[:, None], base + slots, EMPTY)

    def ring_writes(self, spans: RowSpans) -> list[tuple[int, int, int, int]]:
        """(row, first source index, count, first slot) of the new real positions each row keeps:
        those of the last chunk it touches (earlier ones are never needed again)."""
        C, out = self.chunk_size, []
        for b, (start, end) in enumerate(zip(spans.starts.tolist(), spans.ends.tolist(), strict=True)):
            first = max(start, chunk_start(end - 1, C))
            out.append((b, first - start, end - first, first % C))
        return out

    def _check_rewind(self, new: np.ndarray) -> None:
        # Positions chunk_start(new) .. new-1 must still be in their slots: nothing written since may
        # belong to the next chunk, whose positions reuse those slots. A chunk boundary needs nothing.
        C = self.chunk_size
        lost = (new % C != 0) & (self.offsets - 1 >= new // C * C + C)
        if lost.any():
            raise ValueError(f"{type(self).__name__}.rewind: cannot go back from {self.offsets.tolist()} to "
                             f"{new.tolist()} across a chunk (the ring holds one chunk)")

    def can_rewind_to(self, target: int, row: int = 0) -> bool:
        """Whether row `row` could go back to position `target` (see `rewind`)."""
        o, C = int(self.offsets[row]), self.chunk_size
        return 0 <= target <= o and (target % C == 0 or o - 1 < chunk_start(target, C) + C)


def concat_offsets(parts: Sequence[Any]) -> np.ndarray:
    """The offsets of caches stacked row-wise, [sum of B]."""
    return np.concatenate([p.offsets for p in parts])
