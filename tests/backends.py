"""One adapter per backend, so each model test runs unchanged on MLX and torch.

Tests speak numpy; the adapter converts at the edges.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from common.args import ModelArgs
from common.datatypes import TransformerInput


class TorchBackend:
    name = "torch"

    @property
    def module(self) -> Any:
        import torch_backend

        return torch_backend

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def build(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype: str = "float32") -> Any:
        from torch_backend.model import Transformer

        torch = self.torch
        model = Transformer(args)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        model.load_state_dict(state, strict=True)
        return model.to(getattr(torch, dtype)).eval()

    def forward(self, model: Any, tokens: np.ndarray, position: Any = 0, cache: Any = None,
                image_embedding: Any = None, lengths: Any = None) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            inp = TransformerInput(tokens=torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
                                   tokens_position=position, image_embedding=image_embedding, lengths=lengths)
            out = model(inp, cache=cache)
        return out.logits.float().cpu().numpy()

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def merge_caches(self, parts: list) -> list:
        from torch_backend.cache import merge_caches

        return merge_caches(parts)

    def from_numpy(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x))


class MlxBackend:
    name = "mlx"

    @property
    def module(self) -> Any:
        import mlx_llm

        return mlx_llm

    def __init__(self) -> None:
        import mlx.core as mx

        self.mx = mx

    def build(self, args: ModelArgs, weights: dict[str, np.ndarray], dtype: str = "float32") -> Any:
        from mlx_llm.model import Transformer

        mx = self.mx
        model = Transformer(args)
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
        return model

    def forward(self, model: Any, tokens: np.ndarray, position: Any = 0, cache: Any = None,
                image_embedding: Any = None, lengths: Any = None) -> np.ndarray:
        mx = self.mx
        inp = TransformerInput(tokens=mx.array(np.asarray(tokens, dtype=np.int32)),
                               tokens_position=position, image_embedding=image_embedding, lengths=lengths)
        logits = model(inp, cache=cache).logits
        return np.array(logits.astype(mx.float32))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.array(x.astype(self.mx.float32))

    def merge_caches(self, parts: list) -> list:
        from mlx_llm.cache import merge_caches

        return merge_caches(parts)

    def from_numpy(self, x: np.ndarray) -> Any:
        return self.mx.array(x)


def available() -> list[str]:
    names = []
    if importlib.util.find_spec("mlx") is not None:
        names.append("mlx")
    if importlib.util.find_spec("torch") is not None:
        names.append("torch")
    return names


def make(name: str) -> TorchBackend | MlxBackend:
    return MlxBackend() if name == "mlx" else TorchBackend()
