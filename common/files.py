"""Model folders on disk: which layout a folder holds, its config, and its weight files.

Reading tensors is the backends' job; this module only finds and validates files, so both backends
report the same clear errors for the same broken folder.
"""

from __future__ import annotations

import json
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index}: missing or empty 'weight_map'")
        names = sorted(set(weight_map.values()))
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
    config = _read_json(files.config_file)
    try:
        if files.layout == "meta":
            return ModelArgs.from_params(config)
        return ModelArgs.from_hf_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFolderError(f"{files.config_file}: {e}") from e


def check_safetensors(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    Catches truncated or corrupt files with a message naming the file, before any backend maps it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFolderError(f"{path}: corrupt safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ModelFolderError(f"{path}: corrupt safetensors file (header of {n} bytes "
                                       f"does not fit in {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelFolderError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                               f"file has {size}")
    return list(header)
