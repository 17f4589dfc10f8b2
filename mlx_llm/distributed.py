"""Tensor parallelism over `mx.distributed` (ring or MPI backend), started by `mlx.launch`.

`World` is what the model and the generation loops need of the group: the two collectives of a
tensor-parallel forward, and agreeing on a value (a seed, a command) across ranks.
"""

from __future__ import annotations

import pickle
from typing import Any

import mlx.core as mx
import numpy as np

from common.tensor_parallel import Layout


class World:
    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.layout = Layout(self.rank, self.size)

    def all_sum(self, x: mx.array) -> mx.array:
        """The sum of every rank's x (each rank's partial product), on every rank."""
        return mx.distributed.all_sum(x, group=self.group)

    def all_gather_last(self, x: mx.array) -> mx.array:
        """Every rank's x [..., n] side by side in rank order: [..., size * n] (vocabulary-split logits)."""
        parts = mx.distributed.all_gather(x[None], group=self.group)  # [size, ...]
        return mx.concatenate([parts[i] for i in range(self.size)], axis=-1)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank: its bytes summed with zeros elsewhere."""
        data = np.frombuffer(pickle.dumps(value), dtype=np.uint8) if self.rank == 0 else np.zeros(0, np.uint8)
        n = int(mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=self.group).item())
        buf = np.zeros(n, dtype=np.int32)
        buf[: len(data)] = data
        total = np.array(mx.distributed.all_sum(mx.array(buf), group=self.group)).astype(np.uint8)
        return pickle.loads(total.tobytes())

    def agree_seed(self) -> int:
        """One fresh seed drawn by rank 0, so unseeded sampling draws the same numbers on every rank."""
        return int(self.broadcast(int(np.random.default_rng().integers(2**63 - 1)) if self.rank == 0 else None))

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.array([0]), group=self.group))

    def close(self) -> None:
        """The end of a run that went well: every rank meets at a barrier (MLX groups need no teardown)."""
        self.barrier()


def init_world() -> World | None:
    """The group of an `mlx.launch` run with more than one process, else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return World(group) if group.size() > 1 else None
