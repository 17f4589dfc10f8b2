"""Prompt cache: per-layer cache snapshots of earlier requests, reused by requests that extend them.

Backend-neutral bookkeeping over the backends' cache objects (`offsets`, `nbytes`, `copy`, `rewind`,
`can_rewind_to`). An entry holds the caches of one row after exactly its tokens; a request sharing a
prefix of p tokens with it continues from a copy rewound to p. Global layers keep every key, so
any p works for them; a chunk ring holds only the chunk of its last position, so p works where the
ring still holds p's chunk, or at a chunk boundary (which needs nothing from the ring): otherwise
the copy goes back to the chunk boundary below p.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.cache_rows import RingRows


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def reachable_prefix(caches: Sequence[Any], p: int) -> int:
    """The longest prefix <= p that the single-row `caches` can be rewound to (0 = nothing)."""
    if all(c.can_rewind_to(p) for c in caches):
        return p
    chunk = min(c.chunk_size for c in caches if isinstance(c, RingRows))
    return p // chunk * chunk


class PromptCache:
    """An LRU of cache snapshots keyed by token ids, bounded by `max_bytes` of cache storage. A shared
    prefix shorter than `min_prefix` tokens (a lone BOS) is not worth copying an entry: a miss."""

    def __init__(self, max_bytes: int, min_prefix: int = 8) -> None:
        if max_bytes < 0 or min_prefix < 1:
            raise ValueError(f"PromptCache: max_bytes must be >= 0 and min_prefix >= 1, got {max_bytes} and "
                             f"{min_prefix}")
        self.max_bytes, self.min_prefix = max_bytes, min_prefix
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.cached_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, tokens: Sequence[int], caches: list) -> None:
        """Keep `caches` (one row, holding exactly `tokens`; owned by the prompt cache from now on)."""
        key = tuple(int(t) for t in tokens)
        if not key or any(int(c.offsets[0]) != len(key) or c.batch_size != 1 for c in caches):
            raise ValueError(f"PromptCache.insert: caches must hold one row of exactly {len(key)} positions")
        size = sum(c.nbytes for c in caches)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[2]
        self._entries[key] = (np.asarray(key, dtype=np.int64), caches, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1][2]

    def fetch(self, tokens: Sequence[int]) -> tuple[list | None, int]:
        """(a copy of the best entry's caches rewound to the shared prefix, that prefix's length),
        or (None, 0). At least the last token of `tokens` is always left to compute."""
        want = np.asarray(tokens, dtype=np.int64)
        best, best_len = None, self.min_prefix - 1
        for key, (arr, caches, _) in self._entries.items():
            p = reachable_prefix(caches, min(common_prefix(arr, want), len(want) - 1))
            if p > best_len:
                best, best_len = key, p
        if best is None:
            self.misses += 1
            return None, 0
        self._entries.move_to_end(best)
        caches = self._entries[best][1]
        out = [c.copy() for c in caches]
        for c in out:
            c.rewind(len(best) - best_len)
        self.hits += 1
        self.cached_tokens += best_len
        return out, best_len
