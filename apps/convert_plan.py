"""What `apps.convert` writes: which tensors are quantized, under which names, in which files, and how
each tensor is converted row block by row block.

A group is one canonical tensor and the output tensors it becomes: itself in the output dtype, or
the packed weight, scales and biases of MLX affine quantization (`common.quant`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apps.convert_io import FLOAT_NAMES, Entry, ShardWriter
from common.args import ModelArgs, QuantizationArgs
from common.checkpoint import canonical_to_hf, check_keys, hf_to_canonical, meta_shards_to_canonical
from common.files import CheckpointFiles
from common.hf_config import to_hf_text_config
from common.meta_checkpoint import META_VISION
from common.names import canonical_shapes
from common.quant import bf16_bits, can_quantize, from_bf16_bits, packed_shapes, part_names, quantize, round_to
from common.vision_checkpoint import without_absent_vision

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
BLOCK_VALUES = 1 << 22  # values converted at a time: bounds the float32 temporaries (~16 MB each)
_NUMPY_FLOATS = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.uint16): "bfloat16"}


@dataclass(frozen=True)
class Group:
    name: str  # canonical tensor
    spec: QuantizationArgs | None  # None: written in out_dtype, not quantized
    out_dtype: str  # float32 | float16 | bfloat16
    entries: tuple[Entry, ...]  # output tensors (HF / mlx-lm names): the tensor, or weight, scales, biases

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def open_canonical(sources: Sequence[Mapping[str, Any]], args: ModelArgs,
                   meta: bool) -> tuple[Mapping[str, np.ndarray], ModelArgs]:
    """Canonical name -> numpy array (bfloat16 as uint16 bits), each read from the sources on access,
    and the config those tensors fill: without its vision part when they hold no vision tensor at all
    (a text-only export whose config kept its vision_config), else as declared (checked strictly)."""
    canonical = meta_shards_to_canonical(sources, args) if meta else hf_to_canonical(sources[0], args)
    args = without_absent_vision(args, canonical)
    check_keys(canonical, args)
    return canonical, args


def _quantize_spec(name: str, shape: tuple[int, ...], spec: QuantizationArgs | None) -> QuantizationArgs | None:
    # The router stays in full precision: it is tiny (E x D) and its top-k choice is discrete.
    text = not re.fullmatch(META_VISION, name) and not name.endswith("feed_forward.router.weight")
    return spec if spec is not None and text and can_quantize(shape, spec) else None


def plan_groups(canonical: Mapping[str, np.ndarray], args: ModelArgs, quantization: QuantizationArgs | None,
                dtype: str | None) -> list[Group]:
    """One group per canonical tensor, in canonical order, with output names in the mlx-lm layout."""
    out_dtype = dtype or _NUMPY_FLOATS.get(np.dtype(canonical["norm.weight"].dtype), "float32")
    specs = {n: _quantize_spec(n, s, quantization) for n, s in canonical_shapes(args).items()}
    keys = [k for n, spec in specs.items() for k in (part_names(n) if spec else (n,))]
    # Writing stacked experts, canonical_to_hf only renames: map each output name to its canonical key.
    hf = canonical_to_hf({k: k for k in keys}, args, conditional=True, stacked_experts=True)
    to_hf = {hf[h]: h for h in hf}
    groups = []
    for name, shape in canonical_shapes(args).items():
        spec = specs[name]
        if spec is None:
            entries = (Entry(to_hf[name], FLOAT_NAMES[out_dtype], shape),)
        else:
            dtypes = ("U32", FLOAT_NAMES[out_dtype], FLOAT_NAMES[out_dtype])
            entries = tuple(Entry(to_hf[k], d, s) for k, d, s in
                            zip(part_names(name), dtypes, packed_shapes(shape, spec), strict=True))
        groups.append(Group(name, spec, out_dtype, entries))
    return groups


def shard_groups(groups: list[Group], limit: int | None = None) -> list[list[Group]]:
    """Consecutive groups packed into files of at most `limit` bytes (default MAX_SHARD_BYTES); a larger
    group gets a file of its own."""
    limit = MAX_SHARD_BYTES if limit is None else limit
    shards: list[list[Group]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    return shards


def row_blocks(x: np.ndarray, max_values: int = BLOCK_VALUES) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, contiguous copy of rows) over x viewed as [rows, x.shape[-1]], without copying x whole."""
    if x.ndim < 2:
        yield 0, np.ascontiguousarray(x.reshape(1, -1))  # [n] -> [1, n]
        return
    rows, cols = x.shape[-2:]
    step = max(1, max_values // max(cols, 1))
    for i, lead in enumerate(np.ndindex(*x.shape[:-2])):
        matrix = x[lead]  # [rows, cols]: one expert of a stack, or the tensor itself
        for r in range(0, rows, step):
            yield i * rows + r, np.ascontiguousarray(matrix[r : r + step])


def _float32(block: np.ndarray, name: str) -> np.ndarray:
    if block.dtype == np.uint16:  # bfloat16 bit patterns (see apps.convert_io)
        return from_bf16_bits(block)
    if block.dtype.kind != "f":
        raise ValueError(f"{name}: dtype {block.dtype} is not a float; convert reads float checkpoints only")
    return block.astype(np.float32)


def _stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the array written for `dtype` (bfloat16 as its bit patterns)."""
    if dtype == "bfloat16":
        return bf16_bits(x)
    return x.astype(np.float16 if dtype == "float16" else np.float32)


def write_group(writer: ShardWriter, group: Group, x: np.ndarray) -> None:
    """Convert canonical tensor `x` and write the group's output tensors, one row block at a time."""
    names = [e.name for e in group.entries]
    for row, block in row_blocks(x):
        # Rounded to the output dtype first, so quantizing matches MLX quantizing a model in that dtype.
        values = round_to(_float32(block, group.name), group.out_dtype)
        if group.spec is None:
            writer.write(names[0], row, _stored(values, group.out_dtype))
            continue
        q, scales, biases = quantize(values, group.spec.group_size, group.spec.bits, group.out_dtype)
        writer.write(names[0], row, q)
        writer.write(names[1], row, _stored(scales, group.out_dtype))
        writer.write(names[2], row, _stored(biases, group.out_dtype))


def output_config(files: CheckpointFiles, args: ModelArgs, quantization: QuantizationArgs | None,
                  dtype: str) -> dict[str, Any]:
    """The source config as `Llama4ForConditionalGeneration` (the form mlx-lm reads), plus quantization."""
    if files.layout == "meta":
        config: dict[str, Any] = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                                  "text_config": to_hf_text_config(args)}
        if args.vision_args is not None:
            config["vision_config"] = args.vision_args.to_hf_config()
    else:
        config = json.loads(files.config_file.read_text())
        if config.get("model_type") == "llama4_text":  # mlx-lm knows only the nested form
            config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                      "text_config": config}
        if args.vision_args is None:
            config.pop("vision_config", None)  # a text-only export: the output says what it holds
    for c in (config, config["text_config"]):
        c.update({k: dtype for k in ("torch_dtype", "dtype") if k in c})
    config.setdefault("torch_dtype", dtype)
    if quantization is not None:
        config["quantization"] = {"group_size": quantization.group_size, "bits": quantization.bits}
    return config
