"""Per-layer key/value caches: global (grows) and chunked (a fixed ring of one chunk).

Shapes: B batch, K kv heads, L new positions, S cached positions, d head dim, C chunk size.
Keys arrive after RoPE and QK norm, as [B, K, L, d].
"""

from __future__ import annotations

import mlx.core as mx

from common.rope import chunk_start


def _check_batch(keys: mx.array, batch_size: int, cache: str) -> None:
    if keys.ndim != 4 or keys.shape[0] != batch_size:
        raise ValueError(f"{cache}: built for keys [B={batch_size}, K, L, d], got {list(keys.shape)}")


def _zeros_rows(x: mx.array, rows: int) -> mx.array:
    B, K, _, d = x.shape
    return mx.zeros((B, K, rows, d), dtype=x.dtype)  # [B, K, rows, d] in x's dtype


class KVCache:
    """Every position of a global (NoPE) layer; storage grows in steps of `step` positions."""

    step = 256

    def __init__(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Append L positions; return keys and values of positions 0 .. offset+L-1 and k_start 0."""
        _check_batch(keys, self.batch_size, "KVCache")
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[:, :, self.offset : end] = keys
        self.values[:, :, self.offset : end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end], 0  # [B, K, S, d]

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions (their slots are overwritten by the next update)."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"KVCache.rewind: n must be in [0, {self.offset}], got {n}")
        self.offset -= n

    def _grow(self, keys: mx.array, values: mx.array, end: int) -> None:
        # Whole steps, so a decode loop reallocates once per `step` tokens, not per token.
        size = -(-end // self.step) * self.step
        new_k, new_v = _zeros_rows(keys, size), _zeros_rows(values, size)
        if self.keys is not None:
            new_k[:, :, : self.offset] = self.keys[:, :, : self.offset]
            new_v[:, :, : self.offset] = self.values[:, :, : self.offset]
        self.keys, self.values = new_k, new_v

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class ChunkedKVCache:
    """The current attention chunk of a chunked RoPE layer, in `chunk_size` ring slots.

    Chunks align to absolute multiples of C, so position p lives in slot p % C and the current
    chunk's cached keys are slots 0 .. offset % C - 1, in order.
    """

    def __init__(self, chunk_size: int, batch_size: int = 1) -> None:
        if chunk_size <= 0:
            raise ValueError(f"ChunkedKVCache: chunk_size must be > 0, got {chunk_size}")
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        """Add L positions; return keys and values of positions chunk_start(offset) .. offset+L-1.

        A long prefill may return more than C positions (the mask keeps each query in its chunk);
        only the new positions of the last chunk touched are stored.
        """
        _check_batch(keys, self.batch_size, "ChunkedKVCache")
        C, L = self.chunk_size, keys.shape[2]
        if self.keys is None:
            self.keys, self.values = _zeros_rows(keys, C), _zeros_rows(values, C)  # [B, K, C, d]
        k_start = chunk_start(self.offset, C)
        held = self.offset - k_start
        if held + L <= C:
            # Still inside the current chunk: write into the ring, then return its filled slots.
            self.keys[:, :, held : held + L] = keys
            self.values[:, :, held : held + L] = values
            self.offset += L
            return self.keys[:, :, : held + L], self.values[:, :, : held + L], k_start  # [B, K, S, d]
        keys_out = mx.concatenate([self.keys[:, :, :held], keys], axis=2)  # [B, K, held+L, d]
        values_out = mx.concatenate([self.values[:, :, :held], values], axis=2)
        end = self.offset + L
        n = end - chunk_start(end - 1, C)  # new positions in the last chunk touched, slots 0 .. n-1
        self.keys[:, :, :n] = keys[:, :, L - n :]
        self.values[:, :, :n] = values[:, :, L - n :]
        self.offset = end
        return keys_out, values_out, k_start

    def rewind(self, n: int) -> None:
        """Forget the last `n` positions. The ring keeps one chunk, so this works while they lie in the
        chunk of the new offset (always for n = 1: a new chunk's first slot is the only one overwritten)."""
        C, new = self.chunk_size, self.offset - n
        if not 0 <= n <= self.offset:
            raise ValueError(f"ChunkedKVCache.rewind: n must be in [0, {self.offset}], got {n}")
        # Positions chunk_start(new) .. new-1 must still be in their slots: nothing written since
        # may belong to the next chunk, whose positions reuse those slots.
        if new % C and self.offset - 1 >= chunk_start(new, C) + C:
            raise ValueError(f"ChunkedKVCache.rewind: cannot forget {n} of {self.offset} positions across a chunk")
        self.offset = new

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes
