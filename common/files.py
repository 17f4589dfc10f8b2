"""Model folders on disk: which layout a folder holds, its config, and its weight files.

Reading tensors is the backends' job; this module only finds and validates files, so both backends
report the same clear errors for the same broken folder.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.args import ModelArgs


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded: missing, empty, incomplete or corrupt files."""


@dataclass(frozen=True)
class CheckpointFiles:
    folder: Path
    layout: Literal["meta", "hf"]
    config_file: Path  # params.json (meta) or config.json (hf)
    weight_files: tuple[Path, ...]  # consolidated.NN.pth in rank order, or safetensors shards


_PTH = re.compile(r"consolidated\.(\d+)\.pth$")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"names {', '.join(twice[:5])} more than once")
    return dict(pairs)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ModelFolderError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _meta_files(folder: Path) -> tuple[Path, ...]:
    ranks = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _PTH.match(p.name)))
    if not ranks:
        raise ModelFolderError(f"{folder}: params.json found but no consolidated.NN.pth weight files")
    expected = list(range(len(ranks)))
    if [r for r, _ in ranks] != expected:
        found = ", ".join(p.name for _, p in ranks)
        raise ModelFolderError(f"{folder}: model-parallel shards must be numbered 00..{len(ranks) - 1:02d}, "
                               f"found {found}")
    return tuple(p for _, p in ranks)


def _hf_files(folder: Path) -> tuple[Path, ...]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index}: missing or empty 'weight_map'")
        names = sorted(set(map(str, weight_map.values())))
        odd = [n for n in names if Path(n).name != n or n in ("", ".", "..") or not n.endswith(".safetensors")]
        if odd:  # the index may name only .safetensors files beside it, never a path elsewhere
            raise ModelFolderError(f"{index}: weight_map names files that are not .safetensors files in this "
                                   f"folder: {', '.join(odd[:3])}")
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise ModelFolderError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
        return tuple(folder / n for n in names)
    single = folder / "model.safetensors"
    if single.exists():
        return (single,)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelFolderError(f"{folder}: config.json found but no *.safetensors weight files")
    return tuple(shards)


def find_checkpoint(path: str | Path) -> CheckpointFiles:
    """Detect the layout of `path`: Meta native (params.json + consolidated.NN.pth) or HF/MLX."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelFolderError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"not a folder: {folder} (expected a model folder)")
    if (folder / "config.json").exists():
        return CheckpointFiles(folder, "hf", folder / "config.json", _hf_files(folder))
    if (folder / "params.json").exists():
        return CheckpointFiles(folder, "meta", folder / "params.json", _meta_files(folder))
    raise ModelFolderError(
        f"{folder}: no model found; expected params.json + consolidated.NN.pth (Meta native) "
        f"or config.json + *.safetensors (Hugging Face / MLX)")


def read_args(files: CheckpointFiles) -> ModelArgs:
    """The ModelArgs of a folder; config errors name the file."""
    config = read_json(files.config_file)
    try:
        if files.layout == "meta":
            return ModelArgs.from_params(config)
        return ModelArgs.from_hf_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
        # The parsers check types and ranges field by field; anything else a config can provoke is
        # still reported against its file.
        raise ModelFolderError(f"{files.config_file}: {e}") from e


# safetensors dtype -> bytes per element
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20  # the safetensors format's own limit


def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(offset of the data section, tensor entries) of a safetensors file, every entry checked against
    the file: a known dtype, a shape of non-negative ints, offsets inside the data whose span is the
    shape's size. A lying header is an error naming the file, before anything is sized by it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFolderError(f"{path}: corrupt safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise ModelFolderError(f"{path}: corrupt safetensors file (a header of {n} bytes in a file of "
                                       f"{size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelFolderError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data)
    return 8 + n, header


def _check_entry(path: Path, key: str, entry: Any, data: int) -> None:
    def bad(msg: str) -> ModelFolderError:
        return ModelFolderError(f"{path}: tensor {key[:80]!r}: {msg}")

    if not isinstance(entry, dict):
        raise bad("its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r:.60}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data):
        raise bad(f"data_offsets {offsets!r:.60} are not a span inside the {data} bytes of tensor data")
    want = ST_ITEMSIZE[dtype]
    for d in shape:
        want *= d
    if offsets[1] - offsets[0] != want:
        raise bad(f"shape {shape} of {dtype} needs {want} bytes, its data_offsets span {offsets[1] - offsets[0]}")


def check_model_size(files: CheckpointFiles, args: ModelArgs, bytes_per_weight: float) -> None:
    """A config that describes a model far larger than its weight files (which would have memory
    reserved for it before a tensor is read) is an error naming both sizes."""
    from common.names import canonical_shapes

    weights = sum(math.prod(s) for s in canonical_shapes(args).values())
    stored = sum(p.stat().st_size for p in files.weight_files)
    # 4-bit weights expanded to float32 take ~7x their size on disk; beyond 16x the config lies
    if weights * bytes_per_weight > 16 * stored + (64 << 20):
        raise ModelFolderError(f"{files.config_file}: describes {weights / 1e9:.2f}B weights "
                               f"({weights * bytes_per_weight / 1e9:.1f} GB), far more than the "
                               f"{stored / 1e9:.2f} GB of weight files beside it")


def check_safetensors(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    Catches truncated or corrupt files with a message naming the file, before any backend maps it.
    """
    return list(read_safetensors_header(path)[1])
