"""Device and dtype selection for the torch backend, and the MPS-safe way to put masks on a device."""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name must be available as asked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: expected auto, cpu, cuda[:N] or mps, got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {name!r} asked for, but MPS is not available")
    return device


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """A dtype name ("float32", "bfloat16", "float16") to torch; None stays None (keep as stored)."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


def to_device_mask(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy bool attention mask (True = may attend) as a torch bool tensor on `device`.

    Masks are built by comparing position arrays (common.rope.attention_mask), never with
    torch.triu/tril, which give wrong results on MPS for some dtypes.
    """
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.bool_)).to(device)
