"""Per-layer key/value caches (`common.kv_cache`) over MLX arrays.

Shapes: B batch, K kv heads, S slots, d head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from common import kv_cache
from common.kv_cache import merge_caches


class MlxArrays:
    def zeros(self, like: mx.array, batch: int, slots: int) -> mx.array:
        return mx.zeros((batch, like.shape[1], slots, like.shape[3]), dtype=like.dtype)  # [B, K, S, d]

    def cat(self, parts: Sequence[mx.array], axis: int) -> mx.array:
        return mx.concatenate(list(parts), axis=axis)

    def take_rows(self, x: mx.array, rows: np.ndarray, slots: int) -> mx.array:
        return self.settle(x[mx.array(rows), :, :slots])  # [b, K, slots, d]

    def settle(self, x: mx.array) -> mx.array:
        mx.eval(x)
        return x

    def write_by_index(self, store: mx.array, new: mx.array, slots: mx.array) -> None:
        store[mx.arange(store.shape[0]), :, slots] = new[:, :, 0]  # indexed [B, K, d] <- [B, K, d]

    def arange(self, n: int, like: mx.array) -> mx.array:
        return mx.arange(n, dtype=like.dtype)

    def from_numpy(self, x: np.ndarray, like: mx.array) -> mx.array:
        return mx.array(x).astype(like.dtype)


class KVCache(kv_cache.KVCache):
    ops = MlxArrays()


class ChunkedKVCache(kv_cache.ChunkedKVCache):
    ops = MlxArrays()


__all__ = ["ChunkedKVCache", "KVCache", "merge_caches"]
