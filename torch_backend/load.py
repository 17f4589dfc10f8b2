"""Loading models and tokenizers from Meta native, Hugging Face and MLX folders into torch.

Weights stay memory-mapped at their source; each canonical tensor is produced, converted to the
target dtype and device, and placed into a model built on the meta device, so the weights exist
once in memory. MLX quantized folders are dequantized into that dtype as they load
(`torch_backend.quantize`): the same numbers, the memory of the float model.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.args import ModelArgs
from common.checkpoint import checked_items, hf_to_canonical, meta_shards_to_canonical
from common.files import CheckpointFiles, ModelFolderError, check_safetensors, find_checkpoint, read_args
from common.progress import progress
from common.tokenizer import Tokenizer, load_tokenizer_files
from common.vision_checkpoint import without_absent_vision
from torch_backend.device import pick_device, resolve_dtype
from torch_backend.model import Transformer
from torch_backend.quantize import dequantized


class _SafetensorsMapping(Mapping):
    """Tensor name -> tensor of one or more safetensors files, read on access (mmap underneath)."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for path in paths:
            check_safetensors(path)
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise ModelFolderError(f"{path}: cannot open safetensors file ({e})") from e
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                self._where[key] = handle

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_pth(path: Path) -> dict[str, Any]:
    """A Meta `consolidated.NN.pth`, memory-mapped, with no arbitrary unpickling.

    Some released files carry `_extra_state` entries pickled as io.BytesIO; only that class and the
    bytes codec it needs are allowed, and the remapping drops them.
    """
    try:
        with torch.serialization.safe_globals([io.BytesIO, codecs.encode]):
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, zipfile errors
        raise ModelFolderError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise ModelFolderError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def canonical_weights(files: CheckpointFiles, args: ModelArgs) -> Mapping[str, torch.Tensor]:
    """A lazy mapping of canonical names to torch tensors for any supported folder."""
    if files.layout == "meta":
        return meta_shards_to_canonical([read_pth(p) for p in files.weight_files], args)
    return hf_to_canonical(_SafetensorsMapping(files.weight_files), args)


def _stored_dtype(weights: Mapping[str, torch.Tensor]) -> torch.dtype:
    quantized = "tok_embeddings.scales" in weights  # a packed uint32 embedding: its scales hold the dtype
    dtype = weights["tok_embeddings.scales" if quantized else "tok_embeddings.weight"].dtype
    return dtype if dtype.is_floating_point else torch.float32


def load_model(path: str | Path, dtype: str | None = None, device: str | torch.device | None = None,
               show_progress: bool = False) -> Transformer:
    """The model in `path` on `device` (default: cuda > mps > cpu) in `dtype` (default: as stored)."""
    files = find_checkpoint(path)
    args = read_args(files)
    weights = canonical_weights(files, args)
    args = without_absent_vision(args, weights)  # text-only conversions keep a vision_config
    target_device = pick_device("auto" if device is None else str(device))
    target_dtype = resolve_dtype(dtype) or _stored_dtype(weights)
    weights = dequantized(weights, args, target_dtype)  # MLX quantized tensors, expanded on load
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    items = checked_items(weights, args)
    for name, tensor in progress(items, total=len(model.state_dict()), enabled=show_progress, desc="loading"):
        state[name] = tensor.to(device=target_device, dtype=target_dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)  # inference only: no autograd graphs


def load_tokenizer(path: str | Path) -> Tokenizer:
    return load_tokenizer_files(Path(path))


def load(path: str | Path, dtype: str | None = None, device: str | torch.device | None = None,
         show_progress: bool = False) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from one folder."""
    return load_model(path, dtype, device, show_progress), load_tokenizer(path)
