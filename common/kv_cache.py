"""The per-layer key/value caches, written once for both backends over the few array operations each
backend supplies (`ArrayOps`): global layers keep every key, chunked RoPE layers a ring of one chunk.

Rows move together (`update_and_fetch`: one prompt, host-side spans) or each at its own position
(`update_rows`: a batch). Shapes: B batch, K kv heads, L new positions, S returned positions, d head
dim, C chunk size. Keys arrive after RoPE and QK norm, as [B, K, L, d]. Arrays are the backend's
own; indexing and slice assignment work alike on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from common.cache_rows import GlobalRows, RingRows, concat_offsets
from common.rope import chunk_start
from common.spans import RowSpans


class ArrayOps(Protocol):
    def zeros(self, like: Any, batch: int, slots: int) -> Any:
        """[batch, K, slots, d] zeros in the dtype (and on the device) of `like` [*, K, *, d]."""

    def cat(self, parts: Sequence[Any], axis: int) -> Any: ...

    def take_rows(self, x: Any, rows: np.ndarray, slots: int) -> Any:
        """A copy of x[rows, :, :slots], owning its memory."""

    def settle(self, x: Any) -> Any:
        """x computed now (MLX is lazy), so the arrays it was made from can be freed."""

    def write_by_index(self, store: Any, new: Any, slots: Any) -> None:
        """store[b, :, slots[b]] = new[b, :, 0] for every row, in one scatter (no host reads)."""

    def arange(self, n: int, like: Any) -> Any:
        """Ints 0 .. n-1 [n] on the device of `like`, in its dtype."""

    def from_numpy(self, x: np.ndarray, like: Any) -> Any:
        """Host ints as an array on the device of `like`, in its dtype."""


def _check_batch(keys: Any, batch_size: int, cache: str) -> None:
    if len(keys.shape) != 4 or keys.shape[0] != batch_size:
        raise ValueError(f"{cache}: built for keys [B={batch_size}, K, L, d], got {list(keys.shape)}")


class _Storage:
    """Keys and values [B, K, slots, d] (None until first written) with row selection and stacking,
    beside the `common.cache_rows` bookkeeping of the classes below."""

    ops: ClassVar[ArrayOps]
    keys: Any
    values: Any
    offsets: Any

    def _slots_for(self, end: int) -> int:
        raise NotImplementedError

    def _empty(self, batch: int) -> Any:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def select(self, rows: Sequence[int]) -> Any:
        """A new cache holding copies of `rows` (in that order); `select([b])` extracts one row."""
        idx = self.row_index(rows)  # type: ignore[attr-defined]
        out = self._empty(len(idx))
        out.offsets = self.offsets[idx]
        if self.keys is not None:
            n = min(out._slots_for(int(out.offsets.max())), self.keys.shape[2])
            out.keys, out.values = self.ops.take_rows(self.keys, idx, n), self.ops.take_rows(self.values, idx, n)
        return out

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows`: the others' memory is released."""
        kept = self.select(rows)
        self.keys, self.values, self.offsets = kept.keys, kept.values, kept.offsets

    def copy(self) -> Any:
        return self.select(list(range(len(self.offsets))))

    @classmethod
    def merge(cls, parts: Sequence[Any]) -> Any:
        """One cache whose rows are those of `parts`, in order (storage padded to the largest)."""
        out = parts[0]._empty(sum(len(p.offsets) for p in parts))
        out.offsets = concat_offsets(parts)
        full = [p for p in parts if p.keys is not None]
        if full:
            n = max(p.keys.shape[2] for p in full)
            for name in ("keys", "values"):
                like = getattr(full[0], name)
                padded = [cls._padded(getattr(p, name), like, len(p.offsets), n) for p in parts]
                setattr(out, name, cls.ops.settle(cls.ops.cat(padded, 0)))  # [B, K, n, d]
        return out

    @classmethod
    def _padded(cls, x: Any, like: Any, batch: int, slots: int) -> Any:
        if x is None:
            return cls.ops.zeros(like, batch, slots)
        if x.shape[2] == slots:
            return x
        return cls.ops.cat([x, cls.ops.zeros(x, x.shape[0], slots - x.shape[2])], 2)  # [b, K, slots, d]


class KVCache(GlobalRows, _Storage):
    """Every position of a global (NoPE) layer; slot p holds position p."""

    def __init__(self, batch_size: int = 1) -> None:
        super().__init__(batch_size)
        self.keys: Any = None
        self.values: Any = None

    def _slots_for(self, end: int) -> int:
        return self.capacity(end)

    def _empty(self, batch: int) -> KVCache:
        return type(self)(batch)

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any, int]:
        """Rows together: append L positions; return keys and values of positions 0 .. offset+L-1 and k_start 0."""
        _check_batch(keys, self.batch_size, type(self).__name__)
        offset = self.offset
        end = offset + keys.shape[2]
        self._reserve(keys, values, end)
        self.keys[:, :, offset:end] = keys
        self.values[:, :, offset:end] = values
        self.advance_together(end)
        return self.keys[:, :, :end], self.values[:, :, :end], 0  # [B, K, S, d]

    def update_rows(self, keys: Any, values: Any, spans: RowSpans, q_pos: Any) -> tuple[Any, Any, Any]:
        """Rows at their own positions: store each row's real positions; return keys and values
        [B, K, S, d] and the key positions [1, S] (slot s holds position s; causality hides the rest)."""
        _check_batch(keys, self.batch_size, type(self).__name__)
        self.check_spans(spans)
        end = int(spans.ends.max())
        self._reserve(keys, values, end)
        if spans.width == 1:
            out = self.decode_write(keys, values, q_pos)
            self.offsets = spans.ends
            return out
        for b, (start, n) in enumerate(zip(spans.starts.tolist(), spans.lengths.tolist(), strict=True)):
            self.keys[b, :, start : start + n] = keys[b, :, :n]  # padding never reaches the cache
            self.values[b, :, start : start + n] = values[b, :, :n]
        self.offsets = spans.ends
        return self.keys[:, :, :end], self.values[:, :, :end], self.ops.arange(end, q_pos)[None]  # k_pos [1, S]

    def decode_write(self, keys: Any, values: Any, q_pos: Any) -> tuple[Any, Any, Any]:
        """One new position per row (q_pos [B, 1], on the device), written by index; keys and values of
        every slot and their positions [1, S]. Fixed shapes and no host reads or writes: the caller
        keeps `offsets` and has reserved the slots (`reserve`)."""
        self.ops.write_by_index(self.keys, keys, q_pos[:, 0])
        self.ops.write_by_index(self.values, values, q_pos[:, 0])
        return self.keys, self.values, self.ops.arange(self.keys.shape[2], q_pos)[None]  # causality hides the rest

    def reserve(self, end: int, like: Any) -> bool:
        """Slots for positions 0 .. end-1 (`like`: any [*, K, *, d] array of the cache's dtype and device);
        whether the storage was reallocated."""
        if self.keys is not None and end <= self.keys.shape[2]:
            return False
        self._reserve(like, like, end)
        return True

    def _reserve(self, keys: Any, values: Any, end: int) -> None:
        if self.keys is not None and end <= self.keys.shape[2]:
            return
        size = self.capacity(end)
        new_k, new_v = self.ops.zeros(keys, self.batch_size, size), self.ops.zeros(values, self.batch_size, size)
        if self.keys is not None:
            held = int(self.offsets.max())
            new_k[:, :, :held] = self.keys[:, :, :held]
            new_v[:, :, :held] = self.values[:, :, :held]
        self.keys, self.values = new_k, new_v


class ChunkedKVCache(RingRows, _Storage):
    """The current attention chunk of a chunked RoPE layer, in `chunk_size` ring slots."""

    def __init__(self, chunk_size: int, batch_size: int = 1) -> None:
        super().__init__(chunk_size, batch_size)
        self.keys: Any = None
        self.values: Any = None

    def _slots_for(self, end: int) -> int:
        return self.chunk_size

    def _empty(self, batch: int) -> ChunkedKVCache:
        return type(self)(self.chunk_size, batch)

    def _reserve(self, keys: Any, values: Any) -> None:
        if self.keys is None:
            B, C = self.batch_size, self.chunk_size
            self.keys, self.values = self.ops.zeros(keys, B, C), self.ops.zeros(values, B, C)  # [B, K, C, d]

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any, int]:
        """Rows together: add L positions; return keys and values of positions chunk_start(offset) .. offset+L-1.

        A long prefill may return more than C positions (the mask keeps each query in its chunk);
        only the new positions of the last chunk touched are stored.
        """
        _check_batch(keys, self.batch_size, type(self).__name__)
        C, L, offset = self.chunk_size, keys.shape[2], self.offset
        self._reserve(keys, values)
        k_start = chunk_start(offset, C)
        held = offset - k_start
        if held + L <= C:
            # Still inside the current chunk: write into the ring, then return its filled slots.
            self.keys[:, :, held : held + L] = keys
            self.values[:, :, held : held + L] = values
            self.advance_together(offset + L)
            return self.keys[:, :, : held + L], self.values[:, :, : held + L], k_start  # [B, K, S, d]
        keys_out = self.ops.cat([self.keys[:, :, :held], keys], 2)  # [B, K, held+L, d]
        values_out = self.ops.cat([self.values[:, :, :held], values], 2)
        end = offset + L
        n = end - chunk_start(end - 1, C)  # new positions in the last chunk touched, slots 0 .. n-1
        self.keys[:, :, :n] = keys[:, :, L - n :]
        self.values[:, :, :n] = values[:, :, L - n :]
        self.advance_together(end)
        return keys_out, values_out, k_start

    def update_rows(self, keys: Any, values: Any, spans: RowSpans, q_pos: Any) -> tuple[Any, Any, Any]:
        """Rows at their own positions: return the keys and values each row's queries may need
        [B, K, S, d] with their positions [B, S] (EMPTY where a slot holds nothing visible)."""
        _check_batch(keys, self.batch_size, type(self).__name__)
        self.check_spans(spans)
        self._reserve(keys, values)
        if spans.width == 1:
            out = self.decode_write(keys, values, q_pos)
            self.offsets = spans.ends
            return out
        held = self.ops.from_numpy(self.held_positions(), q_pos)  # [B, C]
        keys_out = self.ops.cat([self.keys, keys], 2)  # [B, K, C+L, d]
        values_out = self.ops.cat([self.values, values], 2)
        for b, src, n, slot in self.ring_writes(spans):
            self.keys[b, :, slot : slot + n] = keys[b, :, src : src + n]
            self.values[b, :, slot : slot + n] = values[b, :, src : src + n]
        self.offsets = spans.ends
        return keys_out, values_out, self.ops.cat([held, q_pos], 1)  # k_pos [B, C+L]

    def decode_write(self, keys: Any, values: Any, q_pos: Any) -> tuple[Any, Any, Any]:
        """One new position per row (q_pos [B, 1], on the device) into slot p % C; the ring and its
        positions [B, C]. Fixed shapes and no host reads or writes (the caller keeps `offsets`)."""
        C = self.chunk_size
        self.ops.write_by_index(self.keys, keys, q_pos[:, 0] % C)
        self.ops.write_by_index(self.values, values, q_pos[:, 0] % C)
        # slot s holds chunk_start(p) + s up to p; later slots are stale and causally hidden
        return self.keys, self.values, q_pos // C * C + self.ops.arange(C, q_pos)[None]  # k_pos [B, C]

    def reserve(self, end: int, like: Any) -> bool:
        """The ring's slots (`like` as for `KVCache.reserve`); whether they were allocated now."""
        if self.keys is not None:
            return False
        self._reserve(like, like)
        return True

def merge_caches(parts: Sequence[list]) -> list:
    """Per-layer caches whose rows are those of `parts` (each a model's list of layer caches), in order."""
    return [type(layer[0]).merge(layer) for layer in zip(*parts, strict=True)]
