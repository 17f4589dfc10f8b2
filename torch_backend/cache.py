"""Per-layer key/value caches (`common.kv_cache`) over torch tensors.

Shapes: B batch, K kv heads, S slots, d head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common import kv_cache
from common.kv_cache import merge_caches


class TorchArrays:
    def zeros(self, like: torch.Tensor, batch: int, slots: int) -> torch.Tensor:
        return like.new_zeros((batch, like.shape[1], slots, like.shape[3]))  # [B, K, S, d]

    def cat(self, parts: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(parts), dim=axis)

    def take_rows(self, x: torch.Tensor, rows: np.ndarray, slots: int) -> torch.Tensor:
        return x[torch.from_numpy(rows).to(x.device), :, :slots].clone()  # [b, K, slots, d]

    def settle(self, x: torch.Tensor) -> torch.Tensor:
        return x  # torch computes eagerly

    def write_by_index(self, store: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
        rows = torch.arange(store.shape[0], device=store.device)
        store[rows, :, slots] = new[:, :, 0]  # indexed [B, K, d] <- [B, K, d]

    def arange(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device, dtype=like.dtype)

    def from_numpy(self, x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x).to(device=like.device, dtype=like.dtype)


class KVCache(kv_cache.KVCache):
    ops = TorchArrays()


class ChunkedKVCache(kv_cache.ChunkedKVCache):
    ops = TorchArrays()


__all__ = ["ChunkedKVCache", "KVCache", "merge_caches"]
