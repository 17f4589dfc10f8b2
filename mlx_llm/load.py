"""Loading models and tokenizers from Meta native, Hugging Face and MLX folders into MLX.

safetensors are opened lazily by `mx.load`; nothing is read until the parameters are evaluated,
so the weights exist once in memory. Layers the checkpoint holds quantized (MLX affine, ours or
mlx-lm's) are swapped for quantized layers before loading (`mlx_llm.quantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx

from common.args import ModelArgs
from common.checkpoint import LazyDict, checked_items, hf_to_canonical, meta_shards_to_canonical
from common.files import CheckpointFiles, ModelFolderError, check_safetensors, find_checkpoint, read_args
from common.hub import resolve_model
from common.progress import progress
from common.quant import declared_specs
from common.tensor_parallel import Layout, meta_rank_weights
from common.tokenizer import Tokenizer, load_tokenizer_files
from common.vision_checkpoint import without_absent_vision
from mlx_llm.distributed import World
from mlx_llm.model import Transformer
from mlx_llm.quantize import quantize_modules

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_dtype(name: str | None) -> mx.Dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _torch_to_mx(t: Any) -> mx.array:
    import torch

    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: move the raw 16-bit patterns and reinterpret them.
        return mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.contiguous().numpy())


def _meta_weights(files: CheckpointFiles, args: ModelArgs, layout: Layout | None = None) -> Mapping[str, mx.array]:
    try:
        from torch_backend.load import read_pth
    except ImportError as e:
        raise ModelFolderError(f"{files.folder}: reading Meta native .pth files needs PyTorch; "
                               f"install it with `pip install torch` or convert the folder first") from e
    if layout is None:
        canonical = meta_shards_to_canonical([read_pth(p) for p in files.weight_files], args)
    else:
        canonical = meta_rank_weights(lambda i: read_pth(files.weight_files[i]), len(files.weight_files), args,
                                      layout)
    return LazyDict({k: (lambda k=k: _torch_to_mx(canonical[k])) for k in canonical})


def _safetensors_weights(files: CheckpointFiles) -> dict[str, mx.array]:
    source: dict[str, mx.array] = {}
    for path in files.weight_files:
        check_safetensors(path)
        try:
            arrays = mx.load(str(path))
        except (RuntimeError, ValueError) as e:
            raise ModelFolderError(f"{path}: cannot read safetensors file ({e})") from e
        twice = [k for k in arrays if k in source]
        if twice:
            raise ModelFolderError(f"{path}: tensor {twice[0]} is also in another shard of this checkpoint")
        source.update(arrays)
    return source


class _PerTensorSafetensors(Mapping[str, mx.array]):
    """Safetensors tensors opened one at a time, each from a fresh lazy `mx.load`: nothing keeps a
    tensor once its (tensor-parallel) slice has been copied out, so a rank holds only its share."""

    def __init__(self, files: CheckpointFiles) -> None:
        self._where: dict[str, str] = {}
        for path in files.weight_files:
            names = check_safetensors(path)
            twice = [k for k in names if k in self._where]
            if twice:
                raise ModelFolderError(f"{path}: tensor {twice[0]} is also in another shard of this checkpoint")
            self._where.update(dict.fromkeys(names, str(path)))

    def __getitem__(self, key: str) -> mx.array:
        return mx.load(self._where[key])[key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def canonical_weights(files: CheckpointFiles, args: ModelArgs) -> Mapping[str, mx.array]:
    """A lazy mapping of canonical names to MLX arrays for any supported folder."""
    if files.layout == "meta":
        return _meta_weights(files, args)
    return hf_to_canonical(_safetensors_weights(files), args)


def rank_weights(files: CheckpointFiles, args: ModelArgs, layout: Layout) -> Mapping[str, mx.array]:
    """This rank's share of the canonical weights: a Meta shard of its own where the files allow,
    else lazy slices of the whole."""
    if files.layout == "meta":
        return _meta_weights(files, args, layout)
    return layout.shard(hf_to_canonical(_PerTensorSafetensors(files), args), args)


def _unfused_model(path: str | Path, dtype: str | None, show_progress: bool, world: World | None) -> Transformer:
    files = find_checkpoint(resolve_model(path))
    args = read_args(files)
    if world is None:
        weights = canonical_weights(files, args)
    else:
        weights = rank_weights(files, args, world.layout)
        args = world.layout.local_args(args)
    args = without_absent_vision(args, weights)  # text-only conversions keep a vision_config
    target = resolve_dtype(dtype)
    model = Transformer(args)
    quantize_modules(model, declared_specs(weights, args))  # the layers the checkpoint holds quantized
    items = []
    for name, w in progress(checked_items(weights, args), enabled=show_progress, desc="loading"):
        if target is not None and mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(target)
        # HF experts arrive as transposed views of the file's gate_up_proj / down_proj; matmuls
        # over such views copy the whole stack on every call, so lay them out row-major once.
        w = mx.contiguous(w)
        items.append((name, w))
        if show_progress or world is not None:
            mx.eval(w)  # tensor by tensor: the bar tracks reading, and a rank's slices free their sources
    model.load_weights(items, strict=True)
    mx.eval(model.parameters())
    if world is not None:
        model.attach_world(world)
    return model


def load_model(path: str | Path, dtype: str | None = None, show_progress: bool = False,
               world: World | None = None, revision: str | None = None) -> Transformer:
    """The model in `path` in `dtype` (default: as stored), its projections fused. `world`
    (`mlx_llm.distributed.init_world()`): load only this rank's tensor-parallel share. `path` may be
    a Hugging Face Hub id (`org/name`, at `revision`; a local folder of that name wins)."""
    model = _unfused_model(resolve_model(path, revision), dtype, show_progress, world)
    model.fuse()  # after the loader's references to the source arrays are gone, so they free as it goes
    return model


def load_tokenizer(path: str | Path, revision: str | None = None) -> Tokenizer:
    return load_tokenizer_files(resolve_model(path, revision))


def load(path: str | Path, dtype: str | None = None, show_progress: bool = False,
         world: World | None = None, revision: str | None = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from one folder, or a Hugging Face Hub id (`org/name`, at `revision`)."""
    folder = resolve_model(path, revision)
    return load_model(folder, dtype, show_progress, world), load_tokenizer(folder)
