"""Choosing and driving a backend from the command-line programs, with one interface for both."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pick_backend(name: str = "auto") -> str:
    """`auto`: MLX on Apple silicon when installed, otherwise torch, otherwise MLX (CPU)."""
    if name in ("mlx", "torch"):
        if not _installed(name):
            extra = "mlx" if name == "mlx" else "torch"
            raise RuntimeError(f"backend {name!r} is not installed (pip install -e '.[{extra}]')")
        return name
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; expected auto, mlx or torch")
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    if apple and _installed("mlx"):
        return "mlx"
    if _installed("torch"):
        return "torch"
    if _installed("mlx"):
        return "mlx"
    raise RuntimeError("no backend installed: pip install -e '.[mlx]' or -e '.[torch]'")


@dataclass
class Runner:
    """A loaded model with its backend's generation functions."""

    backend: str
    module: ModuleType
    model: Any
    tokenizer: Any
    world: Any = None  # this process's tensor-parallel world (torchrun / mlx.launch), or None

    def make_cache(self) -> list:
        return self.model.make_cache(1)

    def stream(self, prompt: list[int], max_tokens: int, sampling: Any, cache: list | None = None,
               images: list | None = None):
        return self.module.stream_generate(self.model, self.tokenizer, prompt, max_tokens, sampling, cache,
                                           images=images)


def load_runner(path: str, backend: str = "auto", device: str = "auto", dtype: str | None = None,
                show_progress: bool = True, dequantize: bool = False, compile_decode: bool = False) -> Runner:
    """The model, loaded as this process's tensor-parallel share when a launcher started several
    (torchrun for torch, mlx.launch for MLX), else whole. `dequantize`: torch expands a 4-bit / 8-bit
    folder to its float dtype instead of keeping it packed (`torch_backend.quantize`). `compile_decode`:
    torch on the CPU decodes through `torch.compile` (`torch_backend.compiled`)."""
    name = pick_backend(backend)
    if name == "torch":
        import torch_backend as module
        from torch_backend.distributed import init_world

        world = init_world(device)
        if world is not None and device in ("auto", "cuda"):
            import torch

            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        model, tokenizer = module.load(path, dtype=dtype, device=device, show_progress=show_progress, world=world,
                                       dequantize=dequantize, compile_decode=compile_decode)
    else:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"--device {device} applies to the torch backend only")
        if compile_decode:
            raise ValueError("--compile applies to the torch backend only")
        import mlx_llm as module
        from mlx_llm.distributed import init_world

        world = init_world()
        model, tokenizer = module.load(path, dtype=dtype, show_progress=show_progress, world=world)
    return Runner(name, module, model, tokenizer, world)


def quiet_unless_first(world: Any) -> None:
    """In a tensor-parallel run only rank 0 prints: the others' output goes nowhere."""
    if world is not None and world.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
