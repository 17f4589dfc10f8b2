"""Tensor parallelism over `torch.distributed` (NCCL on CUDA, gloo on the CPU), started by torchrun.

`World` is what the model and the generation loops need of the process group: the two collectives
of a tensor-parallel forward, and agreeing on a value (a seed, a command) across ranks.
"""

from __future__ import annotations

import atexit
import importlib
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.tensor_parallel import Layout


class World:
    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.layout = Layout(self.rank, self.size)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (each rank's partial product), on every rank."""
        x = x.contiguous()
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., n] side by side in rank order: [..., size * n] (vocabulary-split logits)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree_seed(self) -> int:
        """One fresh seed drawn by rank 0, so unseeded sampling draws the same numbers on every rank."""
        return int(self.broadcast(int(np.random.default_rng().integers(2**63 - 1)) if self.rank == 0 else None))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """The end of a run that went well (`close_world`)."""
        close_world()


def close_world() -> None:
    """Every rank meets at a barrier, then the process group is destroyed while the interpreter is fully
    alive: a gloo group left to the interpreter's exit aborted a rank now and then ("terminate called
    without an active exception"). For runs that went well only: a rank that failed mid-collective
    would leave the others waiting at the barrier (the exit handler destroys the group then)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_at_exit() -> None:
    """The exit handler's teardown: nothing where the run closed its world already (destroying twice
    raises)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_world(device: str = "auto") -> World | None:
    """The process group of a torchrun launch (WORLD_SIZE > 1), else None. On CUDA each rank takes the
    GPU of its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # Imported before the group exists: this module's functions take `group=group.WORLD` as a default
        # argument, evaluated on import. Imported later (torch.compile's import brings it), they would hold
        # the group past destroy_process_group, its gloo threads running into the interpreter's teardown,
        # where they aborted a rank now and then ("terminate called without an active exception").
        importlib.import_module("torch.distributed.nn.functional")

        dist.init_process_group("nccl" if cuda else "gloo")
        # Torn down before the interpreter exits: a process group still running its threads at exit
        # aborts the process ("terminate called without an active exception").
        atexit.register(_destroy_at_exit)
    return World()
