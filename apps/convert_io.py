"""Reading checkpoints tensor by tensor and writing safetensors shards piece by piece, for `apps.convert`.

Sources are memory-mapped one tensor at a time (a map lives while its tensor is in use), so reading
a model costs the memory of the tensor at hand, not of the file. numpy has no bfloat16: bfloat16
tensors come back as their uint16 bit patterns (float checkpoints hold no other 16-bit integers).
Meta `.pth` files are read without torch: a restricted unpickler finds each tensor's bytes in the
zip archive, and only tensors, `collections.OrderedDict` and `io.BytesIO` extra state are allowed.
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.files import ModelFolderError, read_safetensors_header

# safetensors dtype name <-> numpy storage dtype; BF16 is stored and read as uint16 bit patterns
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "I64": np.int64,
             "I32": np.int32, "U8": np.uint8, "I8": np.int8, "F64": np.float64, "BOOL": np.bool_}
FLOAT_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_TORCH_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
                   "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ByteStorage": np.uint8, "CharStorage": np.int8, "BoolStorage": np.bool_}


def _mapped(path: Path, offset: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, tensor entries) of a safetensors file, checked against the file."""
    return read_safetensors_header(path)


class SafetensorsSource(Mapping[str, np.ndarray]):
    """Tensor name -> read-only numpy array of one or more safetensors files, mapped on access."""

    def __init__(self, paths: tuple[Path, ...]) -> None:
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for path in paths:
            start, header = read_header(path)
            for key, entry in header.items():
                if entry["dtype"] not in ST_DTYPES:
                    raise ModelFolderError(f"{path}: tensor {key} has dtype {entry['dtype']}, which convert cannot "
                                           f"read (expected one of {', '.join(ST_DTYPES)})")
                if key in self._where:
                    raise ModelFolderError(f"{path}: tensor {key} is also in another shard of this checkpoint")
                self._where[key] = (path, start, entry)

    def dtype_name(self, key: str) -> str:
        return self._where[key][2]["dtype"]

    def __getitem__(self, key: str) -> np.ndarray:
        path, start, entry = self._where[key]
        return _mapped(path, start + entry["data_offsets"][0], ST_DTYPES[entry["dtype"]], tuple(entry["shape"]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@dataclass(frozen=True)
class _TensorRef:
    storage: tuple[str, Any]  # (archive key, numpy dtype or the unsupported storage's name)
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: tuple[str, Any], offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _PthUnpickler(pickle.Unpickler):
    _ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict, ("_io", "BytesIO"): io.BytesIO,
                ("io", "BytesIO"): io.BytesIO, ("_codecs", "encode"): codecs.encode,
                ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return name
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")

    def persistent_load(self, pid: Any) -> tuple[str, Any]:
        _, storage_type, key, *_ = pid  # ('storage', torch.XStorage, key, location, numel)
        return str(key), _TORCH_STORAGES.get(storage_type, storage_type)


class PthSource(Mapping[str, Any]):
    """One `consolidated.NN.pth` (a torch zip archive): name -> numpy array (mapped) or extra state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                self._prefix = pkl[: -len("data.pkl")]
                self._entries = self._unpickle(z.read(pkl))
                self._data = {i.filename: i for i in z.infolist() if i.filename.startswith(self._prefix + "data/")}
        except (OSError, zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError) as e:
            raise ModelFolderError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e

    def _unpickle(self, data: bytes) -> dict[str, Any]:
        try:
            sd = _PthUnpickler(io.BytesIO(data)).load()
        except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (OverflowError, KeyError, ...)
            raise ModelFolderError(f"{self.path}: cannot read checkpoint ({type(e).__name__} in data.pkl: {e})") from e
        if not isinstance(sd, dict):
            raise ModelFolderError(f"{self.path}: expected a dict of tensors, got {type(sd).__name__}")
        return dict(sd)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ModelFolderError(f"{self.path}: {info.filename} is compressed; torch.save stores tensors raw")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # zip local file header; name and extra field lengths at bytes 26..29
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def __getitem__(self, key: str) -> Any:
        ref = self._entries[key]
        if not isinstance(ref, _TensorRef):
            return ref
        storage, dtype = ref.storage
        if isinstance(dtype, str):
            raise ModelFolderError(f"{self.path}: tensor {key} is stored as torch.{dtype}, which convert cannot read")
        info = self._data[f"{self._prefix}data/{storage}"]
        item = np.dtype(dtype).itemsize
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True)) if all(ref.shape) else 0
        base = _mapped(self.path, self._data_offset(info) + ref.offset * item, dtype, (span,))
        if span == 0:
            return np.zeros(ref.shape, dtype=dtype)
        return np.lib.stride_tricks.as_strided(base, ref.shape, tuple(s * item for s in ref.stride), writeable=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Entry:
    """One tensor of an output file."""

    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, U32
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(ST_DTYPES[self.dtype]).itemsize


class ShardWriter:
    """A safetensors file whose header is written first, so tensors can be filled in piece by piece.

    `write(name, row, data)` puts rows of a tensor (C order, leading axes flattened) in their place;
    `finish()` checks that every data byte was written. Use as a context manager.
    """

    def __init__(self, path: Path, entries: list[Entry]) -> None:
        self.path = path
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        self._where: dict[str, tuple[int, Entry]] = {}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            self._where[e.name] = (offset, e)
            offset += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._start, self._size, self._written = 8 + len(text), offset, 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pwrite(struct.pack("<Q", len(text)) + text, 0)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def _pwrite(self, data: bytes | memoryview, at: int) -> None:
        view, done = memoryview(data), 0
        while done < len(view):  # pwrite may write less than asked
            done += os.pwrite(self._fd, view[done:], at + done)

    def write(self, name: str, row: int, data: np.ndarray) -> None:
        offset, entry = self._where[name]
        row_bytes = entry.nbytes // max(1, int(np.prod(entry.shape[:-1])))
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # the bytes, C order
        if row * row_bytes + raw.size > entry.nbytes:
            raise ValueError(f"{self.path.name}: {name}: {raw.size} bytes at row {row} overrun the tensor")
        self._pwrite(raw.data, self._start + offset + row * row_bytes)
        self._written += raw.size

    def finish(self) -> None:
        if self._written != self._size:
            raise ValueError(f"{self.path}: wrote {self._written} of {self._size} data bytes")
        os.fsync(self._fd)
