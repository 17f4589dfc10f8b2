"""The decode step through CUDA graphs: `Transformer.decode_rows` captured once per batch bucket
(1, 2, 4, 8, 16, ... rows) and replayed with new tokens and positions, so a step costs a few
launches instead of hundreds of kernel launches and host round trips.

A graph reads and writes fixed addresses: its static inputs, the RoPE / temperature tables and the
caches' storage. `RowPool` keeps a batch's caches in storage that stays put while rows join and
leave (leavers' places are filled by moving later rows down), so a bucket's graph is captured once
and replayed until a cache or table has to grow (then it is captured again). Rows past the live
ones in a bucket are padding: they decode token 0 at position 0 into their own unused slots.
Off CUDA (and with graphs off) the same runner calls the step directly, or compiled on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from torch_backend.cache import ChunkedKVCache, KVCache
from torch_backend.model import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
AHEAD = 1024  # a global cache that must grow grows this much further, so graphs are captured again rarely
# The compiled CPU step attends over every reserved slot (masked), so it reserves less ahead.
CPU_AHEAD = 256
Cache = KVCache | ChunkedKVCache


def bucket(n: int) -> int:
    """The smallest bucket holding n rows."""
    for b in BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"decode graphs take at most {BUCKETS[-1]} rows, got {n}")


def view_rows(caches: Sequence[Cache], rows: int) -> list[Cache]:
    """Caches over the first `rows` rows of `caches`' storage (views: writes land in the storage)."""
    out = []
    for c in caches:
        v = c._empty(rows)
        v.offsets = c.offsets[:rows]
        if c.keys is not None:
            v.keys, v.values = c.keys[:rows], c.values[:rows]  # [rows, K, S, d] views
        out.append(v)
    return out


class RowPool:
    """A batch's per-layer caches in storage for `capacity` rows, of which the first `n` are live."""

    def __init__(self, model: Transformer, capacity: int) -> None:
        self.model, self.capacity, self.n = model, capacity, 0
        self.caches: list[Cache] = model.make_cache(capacity)

    def admit(self, rows: Sequence[list[Cache]]) -> None:
        """Copy the rows (each a model's list of single-row caches) into places n, n+1, ..."""
        if self.n + len(rows) > self.capacity:
            raise ValueError(f"RowPool: {self.n} + {len(rows)} rows exceed its {self.capacity} places")
        for row in rows:
            end = int(row[0].offsets[0])
            self.model.prepare_decode(self.caches, end + 1, AHEAD)  # live rows keep their slots through a growth
            for pool, one in zip(self.caches, row, strict=True):
                if one.keys is not None:
                    n = min(one.keys.shape[2], pool.keys.shape[2])  # a ring's C slots, or every cached position
                    pool.keys[self.n, :, :n] = one.keys[0, :, :n]
                    pool.values[self.n, :, :n] = one.values[0, :, :n]
                offsets = pool.offsets.copy()
                offsets[self.n] = end
                pool.offsets = offsets
            self.n += 1

    def keep(self, rows: Sequence[int]) -> None:
        """Keep the live rows `rows` (ascending), moved down to places 0 .. len(rows)-1 in that order."""
        if any(b <= a for a, b in zip(rows, rows[1:], strict=False)) or (rows and rows[-1] >= self.n):
            raise ValueError(f"RowPool.keep: expected ascending live rows below {self.n}, got {list(rows)}")
        for c in self.caches:
            for to, src in enumerate(rows):
                if to != src and c.keys is not None:  # src > to: a row moves down over a leaver's place
                    c.keys[to] = c.keys[src]
                    c.values[to] = c.values[src]
            offsets = c.offsets.copy()
            offsets[: len(rows)] = c.offsets[list(rows)]
            c.offsets = offsets
        self.n = len(rows)

    def __iter__(self):
        return iter(self.caches)

    def select(self, rows: Sequence[int]) -> list[Cache]:
        return [c.select(list(rows)) for c in self.caches]

    def advance(self, positions: np.ndarray) -> None:
        """The live rows now hold their positions up to `positions` (the step just decoded)."""
        for c in self.caches:
            offsets = c.offsets.copy()
            offsets[: self.n] = positions + 1
            c.offsets = offsets


class DecodeRunner:
    """`model.decode_rows` for the live rows of caches with room for their bucket, through CUDA graphs
    where `graphs` is on and the model is on CUDA, compiled where `compiled` is on and the model is on
    the CPU (`torch_backend.compiled`), else directly."""

    def __init__(self, model: Transformer, graphs: bool, compiled: bool = False) -> None:
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.graphs = graphs and self.device.type == "cuda"
        self.step = model.decode_rows
        self.ahead = AHEAD if self.graphs else 0  # positions a cache that must grow reserves beyond the step
        if compiled and self.device.type == "cpu":
            from torch_backend.compiled import CompiledStep

            self.step, self.ahead = CompiledStep(model), CPU_AHEAD
        self._captured: dict[int, tuple[tuple[int, ...], object, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool = None

    @classmethod
    def for_model(cls, model: Transformer) -> DecodeRunner | None:
        """The runner a single sequence decodes through: CUDA graphs on CUDA (unless `model.cuda_graphs` is
        off), the compiled step on the CPU where `model.compile_decode` is on (one process); None: the model's
        forward."""
        device = model.tok_embeddings.weight.device
        if device.type == "cuda" and model.cuda_graphs:
            return cls(model, graphs=True)
        if device.type == "cpu" and model.compile_decode and model.world is None:
            if model._compiled_runner is None:  # one per model: its compiled graph is reused by every call
                model._compiled_runner = cls(model, graphs=False, compiled=True)
            return model._compiled_runner
        return None

    def warm_up(self) -> None:
        """One step of one row on a throwaway cache: a compiled step compiles here."""
        from common.datatypes import TransformerInput

        cache = self.model.make_cache(1)
        with torch.inference_mode():  # the inputs are inference tensors, as in generation (the graph's guards tell)
            token = torch.zeros(1, dtype=torch.long, device=self.device)
            self.model(TransformerInput(tokens=token[None], tokens_position=0), cache=cache)
            self(cache, 1, token, np.array([1]))

    def __call__(self, caches: Sequence[Cache], n: int, tokens: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """Logits [n, V] of the first n rows decoding `tokens` [n] (device) at `positions` [n] (host)."""
        end = int(positions.max()) + 1
        b = bucket(n) if self.graphs else n
        self.model.prepare_decode(list(caches), end, self.ahead)
        if not self.graphs and b == caches[0].batch_size:  # every row: the caches themselves (no views to make)
            pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
            return self.step(tokens, pos.to(self.device), list(caches))
        views = view_rows(caches, b)
        pos = torch.zeros(b, dtype=torch.long)
        pos[:n] = torch.from_numpy(positions)
        if not self.graphs:
            return self.step(tokens, pos.to(self.device), views)
        return self._replay(views, b, n, tokens, pos)

    def _signature(self, views: Sequence[Cache]) -> tuple[int, ...]:
        tables = [t.rows for t in (self.model.rope, self.model.temperatures) if t is not None]
        return tuple(x.data_ptr() for x in [*tables, *(a for c in views for a in (c.keys, c.values))])

    def _replay(self, views: list[Cache], b: int, n: int, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        entry = self._captured.get(b)
        signature = self._signature(views)
        if entry is None or entry[0] != signature:
            entry = self._capture(views, b, signature, tokens, pos)
            self._captured[b] = entry
        _, graph, static_tokens, static_positions, static_logits = entry
        static_tokens.zero_()
        static_tokens[:n].copy_(tokens)
        static_positions.copy_(pos, non_blocking=True)
        graph.replay()
        return static_logits[:n].clone()

    def _capture(self, views: list[Cache], b: int, signature: tuple[int, ...], tokens: torch.Tensor,
                 pos: torch.Tensor) -> tuple:
        """Warm up on a side stream, then capture. Both run with this step's real inputs, so the keys
        they write are the very ones the replay writes; padding rows write into unused places."""
        static_tokens = torch.zeros(b, dtype=torch.long, device=self.device)
        static_tokens[: tokens.shape[0]].copy_(tokens)
        static_positions = pos.to(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            self.model.decode_rows(static_tokens, static_positions, views)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            static_logits = self.model.decode_rows(static_tokens, static_positions, views)
        return signature, graph, static_tokens, static_positions, static_logits
