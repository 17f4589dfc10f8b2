"""Per-layer key/value caches: global (grows) and chunked (a fixed ring of one chunk), for rows that
move together (`update_and_fetch`) or each at its own position (`update_rows`).

Shapes: B batch, K kv heads, L new positions, S cached positions, d head dim, C chunk size.
Keys arrive after RoPE and QK norm, as [B, K, L, d]. The bookkeeping lives in `common.cache_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from common.cache_rows import GlobalRows, RingRows, concat_offsets
from common.rope import chunk_start
from common.spans import RowSpans


def _check_batch(keys: mx.array, batch_size: int, cache: str) -> None:
    if keys.ndim != 4 or keys.shape[0] != batch_size:
        raise ValueError(f"{cache}: built for keys [B={batch_size}, K, L, d], got {list(keys.shape)}")


def _zeros_like_rows(x: mx.array, rows: int, batch: int | None = None) -> mx.array:
    B, K, _, d = x.shape
    return mx.zeros((B if batch is None else batch, K, rows, d), dtype=x.dtype)  # [B, K, rows, d] in x's dtype


def _write_by_index(store: mx.array, new: mx.array, slots: mx.array) -> None:
    """store[b, :, slots[b]] = new[b, :, 0] for every row: one scatter, no host reads (decode)."""
    store[mx.arange(store.shape[0]), :, slots] = new[:, :, 0]  # indexed view [B, K, d] <- [B, K, d]


class _Storage:
    """Keys and values [B, K, slots, d] with row selection and stacking; `None` until first written.
    Mixed into the caches below, beside their `common.cache_rows` bookkeeping (`offsets`, `row_index`)."""

    keys: mx.array | None
    values: mx.array | None
    offsets: Any

    def _slots_for(self, rows: int) -> int:
        raise NotImplementedError

    def _empty_like(self, batch: int) -> Any:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def select(self, rows: Sequence[int]) -> Any:
        """A new cache holding copies of `rows` (in that order); `select([b])` extracts one row."""
        idx = self.row_index(rows)
        out = self._empty_like(len(idx))
        out.offsets = self.offsets[idx].copy()
        if self.keys is not None and self.values is not None:
            n = out._slots_for(int(out.offsets.max()))
            at = mx.array(idx)
            out.keys = self.keys[at, :, :n]  # a copy [b, K, n, d]
            out.values = self.values[at, :, :n]
            mx.eval(out.keys, out.values)  # computed now, so the source's memory can go
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
        out = parts[0]._empty_like(sum(len(p.offsets) for p in parts))
        out.offsets = concat_offsets(parts)
        full = [p for p in parts if p.keys is not None]
        if full:
            n = max(p.keys.shape[2] for p in full)
            like = full[0].keys
            out.keys = mx.concatenate([_padded(p.keys, like, len(p.offsets), n) for p in parts], axis=0)  # [B, K, n, d]
            out.values = mx.concatenate([_padded(p.values, full[0].values, len(p.offsets), n) for p in parts], axis=0)
            mx.eval(out.keys, out.values)  # computed now, so the parts' memory can go
        return out


def _padded(x: mx.array | None, like: mx.array, batch: int, slots: int) -> mx.array:
    if x is None:
        return _zeros_like_rows(like, slots, batch)
    if x.shape[2] == slots:
        return x
    return mx.concatenate([x, _zeros_like_rows(x, slots - x.shape[2])], axis=2)  # [b, K, slots, d]


class KVCache(GlobalRows, _Storage):
    """Every position of a global (NoPE) layer; slot p holds position p."""

    def __init__(self, batch_size: int = 1) -> None:
        super().__init__(batch_size)
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def _slots_for(self, rows: int) -> int:
        return self.capacity(rows)

    def _empty_like(self, batch: int) -> KVCache:
        return KVCache(batch)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Rows together: append L positions; return keys and values of positions 0 .. offset+L-1 and k_start 0."""
        _check_batch(keys, self.batch_size, "KVCache")
        offset = self.offset
        end = offset + keys.shape[2]
        self._reserve(keys, values, end)
        self.keys[:, :, offset:end] = keys
        self.values[:, :, offset:end] = values
        self.advance_together(end)
        return self.keys[:, :, :end], self.values[:, :, :end], 0  # views [B, K, S, d]

    def update_rows(self, keys: mx.array, values: mx.array, spans: RowSpans,
                    q_pos: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Rows at their own positions: store each row's real positions; return keys and values
        [B, K, S, d] and the key positions [1, S] (slot s holds position s; causality hides the rest)."""
        _check_batch(keys, self.batch_size, "KVCache")
        self.check_spans(spans)
        end = int(spans.ends.max())
        self._reserve(keys, values, end)
        if spans.width == 1:  # decode: one scatter at each row's position
            _write_by_index(self.keys, keys, q_pos[:, 0])
            _write_by_index(self.values, values, q_pos[:, 0])
            end = self.keys.shape[2]  # every slot, so the shapes stay fixed between growths
        else:
            for b, (start, n) in enumerate(zip(spans.starts.tolist(), spans.lengths.tolist(), strict=True)):
                self.keys[b, :, start : start + n] = keys[b, :, :n]  # padding never reaches the cache
                self.values[b, :, start : start + n] = values[b, :, :n]
        self.offsets = spans.ends.copy()
        k_pos = mx.arange(end)[None]  # [1, S]
        return self.keys[:, :, :end], self.values[:, :, :end], k_pos

    def _reserve(self, keys: mx.array, values: mx.array, end: int) -> None:
        if self.keys is not None and self.values is not None and end <= self.keys.shape[2]:
            return
        size = self.capacity(end)
        new_k, new_v = _zeros_like_rows(keys, size), _zeros_like_rows(values, size)
        if self.keys is not None and self.values is not None:
            held = int(self.offsets.max())
            new_k[:, :, :held] = self.keys[:, :, :held]
            new_v[:, :, :held] = self.values[:, :, :held]
        self.keys, self.values = new_k, new_v


class ChunkedKVCache(RingRows, _Storage):
    """The current attention chunk of a chunked RoPE layer, in `chunk_size` ring slots."""

    def __init__(self, chunk_size: int, batch_size: int = 1) -> None:
        super().__init__(chunk_size, batch_size)
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def _slots_for(self, rows: int) -> int:
        return self.chunk_size

    def _empty_like(self, batch: int) -> ChunkedKVCache:
        return ChunkedKVCache(self.chunk_size, batch)

    def _reserve(self, keys: mx.array, values: mx.array) -> None:
        if self.keys is None or self.values is None:
            C = self.chunk_size
            self.keys, self.values = _zeros_like_rows(keys, C), _zeros_like_rows(values, C)  # [B, K, C, d]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Rows together: add L positions; return keys and values of positions chunk_start(offset) .. offset+L-1.

        A long prefill may return more than C positions (the mask keeps each query in its chunk);
        only the new positions of the last chunk touched are stored.
        """
        _check_batch(keys, self.batch_size, "ChunkedKVCache")
        C, L, offset = self.chunk_size, keys.shape[2], self.offset
        self._reserve(keys, values)
        k_start = chunk_start(offset, C)
        held = offset - k_start
        if held + L <= C:
            # Still inside the current chunk: write into the ring, then return a view of it.
            self.keys[:, :, held : held + L] = keys
            self.values[:, :, held : held + L] = values
            self.advance_together(offset + L)
            return self.keys[:, :, : held + L], self.values[:, :, : held + L], k_start  # [B, K, S, d]
        keys_out = mx.concatenate([self.keys[:, :, :held], keys], axis=2)  # [B, K, held+L, d]
        values_out = mx.concatenate([self.values[:, :, :held], values], axis=2)
        end = offset + L
        n = end - chunk_start(end - 1, C)  # new positions in the last chunk touched, slots 0 .. n-1
        self.keys[:, :, :n] = keys[:, :, L - n :]
        self.values[:, :, :n] = values[:, :, L - n :]
        self.advance_together(end)
        return keys_out, values_out, k_start

    def update_rows(self, keys: mx.array, values: mx.array, spans: RowSpans,
                    q_pos: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Rows at their own positions: return the keys and values each row's queries may need
        [B, K, S, d] with their positions [B, S] (EMPTY where a slot holds nothing visible)."""
        _check_batch(keys, self.batch_size, "ChunkedKVCache")
        self.check_spans(spans)
        C = self.chunk_size
        self._reserve(keys, values)
        if spans.width == 1:  # decode: write slot p % C of each row, then attend over the ring
            _write_by_index(self.keys, keys, q_pos[:, 0] % C)
            _write_by_index(self.values, values, q_pos[:, 0] % C)
            self.offsets = spans.ends.copy()
            # slot s holds chunk_start(p) + s up to p; later slots are stale and causally hidden
            k_pos = q_pos // C * C + mx.arange(C)[None]  # [B, C]
            return self.keys, self.values, k_pos
        held = mx.array(self.held_positions()).astype(q_pos.dtype)  # [B, C]
        keys_out = mx.concatenate([self.keys, keys], axis=2)  # [B, K, C+L, d]
        values_out = mx.concatenate([self.values, values], axis=2)
        for b, src, n, slot in self.ring_writes(spans):
            self.keys[b, :, slot : slot + n] = keys[b, :, src : src + n]
            self.values[b, :, slot : slot + n] = values[b, :, src : src + n]
        self.offsets = spans.ends.copy()
        return keys_out, values_out, mx.concatenate([held, q_pos], axis=1)  # k_pos [B, C+L]


Cache = KVCache | ChunkedKVCache


def merge_caches(parts: Sequence[list[Cache]]) -> list[Cache]:
    """Per-layer caches whose rows are those of `parts` (each a model's list of layer caches), in order."""
    return [type(layer[0]).merge(layer) for layer in zip(*parts, strict=True)]
