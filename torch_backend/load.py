"""Loading models and tokenizers from Meta native, Hugging Face and MLX folders into torch.

Tensors are read one at a time from memory-mapped files; each canonical tensor is produced, then
copied (converted to the target dtype and device) into the
model's preallocated storage, so the weights exist once in memory. MLX quantized folders keep
their weights packed on the CPU and CUDA where torch's integer kernels take them, and are dequantized into
the model's dtype otherwise (`torch_backend.quantize`).
"""

from __future__ import annotations

import codecs
import io
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.args import ModelArgs
from common.checkpoint import checked_items, hf_to_canonical, meta_shards_to_canonical
from common.files import (
    CheckpointFiles,
    ModelFolderError,
    check_model_size,
    find_checkpoint,
    read_args,
    read_safetensors_header,
)
from common.hub import resolve_model
from common.progress import progress
from common.tensor_parallel import Layout, meta_rank_weights
from common.tokenizer import Tokenizer, load_tokenizer_files
from common.vision_checkpoint import without_absent_vision
from torch_backend.device import pick_device, resolve_dtype
from torch_backend.distributed import World
from torch_backend.fused import allocate
from torch_backend.model import Transformer
from torch_backend.quantize import dequantized, keep_packed

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U32": torch.uint32, "BOOL": torch.bool}


class _SafetensorsMapping(Mapping):
    """Tensor name -> tensor of one or more safetensors files, memory-mapped, read on access.

    Mapped pages count as this process's memory while they stay in its page tables, so the pages
    of the tensor read before are handed back (madvise DONTNEED) when the next is asked for: the
    checkpoint is not counted a second time beside the model it is copied into. The maps are
    private (copy-on-write), so a consumer writing into a tensor can never reach the file.
    """

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self._where: dict[str, tuple[mmap.mmap, int, dict[str, Any]]] = {}
        self._last: tuple[str, torch.Tensor, mmap.mmap, int, int] | None = None
        for path in paths:
            start, header = read_safetensors_header(path)
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            for key, entry in header.items():
                if entry["dtype"] not in _ST_DTYPES:
                    raise ModelFolderError(f"{path}: {key} has dtype {entry['dtype']!r}, which torch cannot read")
                if key in self._where:
                    raise ModelFolderError(f"{path}: tensor {key} is also in another shard of this checkpoint")
                self._where[key] = (mapped, start, entry)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None:
            if self._last[0] == key:  # HF gate_up_proj is asked for twice in a row
                return self._last[1]
            self._release(*self._last[2:])
        mapped, data_start, entry = self._where[key]
        lo, hi = data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1]
        dtype = _ST_DTYPES[entry["dtype"]]
        tensor = (torch.frombuffer(mapped, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=lo) if hi > lo
                  else torch.empty(0, dtype=dtype)).reshape(entry["shape"])
        self._last = (key, tensor, mapped, lo, hi)
        return tensor

    @staticmethod
    def _release(mapped: mmap.mmap, lo: int, hi: int) -> None:
        start = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside [lo, hi) only
        if hi - start >= mmap.PAGESIZE:
            mapped.madvise(mmap.MADV_DONTNEED, start, (hi - start) // mmap.PAGESIZE * mmap.PAGESIZE)

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


def rank_weights(files: CheckpointFiles, args: ModelArgs, layout: Layout) -> Mapping[str, torch.Tensor]:
    """This rank's share of the canonical weights: a Meta shard of its own where the files allow,
    else lazy slices of the whole (safetensors are memory-mapped, so a slice reads only its bytes)."""
    if files.layout == "meta":
        return meta_rank_weights(lambda i: read_pth(files.weight_files[i]), len(files.weight_files), args, layout)
    return layout.shard(canonical_weights(files, args), args)


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
               show_progress: bool = False, cuda_graphs: bool = True, world: World | None = None,
               revision: str | None = None, dequantize: bool = False, compile_decode: bool = False) -> Transformer:
    """The model in `path` on `device` (default: cuda > mps > cpu) in `dtype` (default: as stored).
    `cuda_graphs`: on CUDA, decode through CUDA graphs (`torch_backend.graphs`); False decodes eagerly.
    `compile_decode`: on the CPU, a single sequence decodes through `torch.compile` (`torch_backend.compiled`).
    `world` (`torch_backend.distributed.init_world()`): load only this rank's tensor-parallel share.
    `path` may be a Hugging Face Hub id (`org/name`, at `revision`; a local folder of that name wins).
    A quantized folder stays packed on the CPU and CUDA (`torch_backend.quantize`) unless `dequantize`."""
    files = find_checkpoint(resolve_model(path, revision))
    args = read_args(files)
    if world is None:
        weights = canonical_weights(files, args)
    else:
        weights = rank_weights(files, args, world.layout)
        args = world.layout.local_args(args)
    args = without_absent_vision(args, weights)  # text-only conversions keep a vision_config
    target_device = pick_device("auto" if device is None else str(device))
    target_dtype = resolve_dtype(dtype) or _stored_dtype(weights)
    check_model_size(files, args, target_dtype.itemsize * (1 if world is None else world.size))
    with torch.device("meta"):
        model = Transformer(args)
    packable = world is None and target_device.type in ("cpu", "cuda") and not dequantize
    kept = keep_packed(model, weights, args, target_dtype, target_device) if packable else set()
    weights = dequantized(weights, args, target_dtype, kept)  # other MLX quantized tensors, expanded on load
    # Allocate the final (fused) storage once, then copy each tensor into place as it is read, so
    # the weights exist once in memory.
    allocate(model, target_device, target_dtype)
    model.requires_grad_(False)
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in kept}
    items = checked_items(weights, args)
    with torch.no_grad():
        for name, tensor in progress(items, total=len(targets) + len(kept), enabled=show_progress, desc="loading"):
            if name in kept:
                continue
            target = targets.pop(name, None)
            if target is None:
                raise ModelFolderError(f"{path}: {name} is not a parameter of this model")
            target.copy_(tensor)  # converts dtype and device on the way
    if targets:  # checked_items already checked the names: a model / checkpoint mismatch
        raise ModelFolderError(f"{path}: no weights for {', '.join(sorted(targets)[:5])}")
    model.cuda_graphs = cuda_graphs
    model.compile_decode = compile_decode
    if world is not None:
        model.attach_world(world)
    model.eval()  # inference only: no autograd graphs
    if compile_decode:
        from torch_backend.graphs import DecodeRunner

        runner = DecodeRunner.for_model(model)
        if runner is not None:
            runner.warm_up()  # the step compiles while loading, not inside the first generation
    return model


def load_tokenizer(path: str | Path, revision: str | None = None) -> Tokenizer:
    return load_tokenizer_files(resolve_model(path, revision))


def load(path: str | Path, dtype: str | None = None, device: str | torch.device | None = None,
         show_progress: bool = False, cuda_graphs: bool = True, world: World | None = None,
         revision: str | None = None, dequantize: bool = False,
         compile_decode: bool = False) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from one folder, or a Hugging Face Hub id (`org/name`, at `revision`)."""
    folder = resolve_model(path, revision)
    model = load_model(folder, dtype, device, show_progress, cuda_graphs, world, dequantize=dequantize,
                       compile_decode=compile_decode)
    return model, load_tokenizer(folder)
