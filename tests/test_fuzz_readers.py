"""Property-based fuzzing of everything that reads a file: configs, safetensors (headers, index),
`.pth` files, tokenizer files and images, broken in generated ways. Each reader either works or
raises a ValueError (ModelFolderError, CheckpointError, TokenizerError, ImageError) naming what
was wrong: never another exception type, a hang (each case has a deadline), or an allocation sized
by a lying header."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from folders import TINY_PARAMS, meta_args, write_hf, write_meta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import random_weights, tiny_args

from common.files import find_checkpoint, read_args
from common.hf_config import to_hf_text_config

pytestmark = pytest.mark.filterwarnings("ignore")
ARGS = tiny_args()
FAST = settings(max_examples=200, deadline=3000, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=200, deadline=10000, suppress_health_check=list(HealthCheck))

values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-3, 10**6), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def clean(fn, *args) -> None:
    """`fn` succeeds or raises a ValueError subclass whose message is not empty."""
    try:
        fn(*args)
    except ValueError as e:
        assert str(e), f"{type(e).__name__} without a message"


def _paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in config.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, key))
    return out


def mutate(config: dict, draw) -> dict:
    """A deep copy of `config` with 1-3 fields (nested ones too) deleted or set to generated values."""
    out = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(out)
        if not paths:
            break
        *parents, key = draw(st.sampled_from(paths))
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if draw(st.booleans()):
                node.pop(key, None)
            else:
                node[key] = draw(values)
    return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf"), ARGS, random_weights(ARGS, seed=1))


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_meta(tmp_path_factory.mktemp("meta"), random_weights(meta_args(), seed=1))


def _fresh_case(folder: Path, name: str) -> Path:
    """A fresh copy of `folder` beside it, `case-{name}`, for one example to break."""
    case = folder.parent / f"case-{name}"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(folder, case)
    return case


def _config_case(folder: Path, name: str, base: dict, data) -> Path:
    case = _fresh_case(folder, name)
    (case / name).write_text(json.dumps(mutate(base, data.draw), allow_nan=True))
    return case


@FAST
@given(data=st.data())
def test_config_json(hf_folder: Path, data) -> None:
    base = {"model_type": "llama4", "text_config": to_hf_text_config(ARGS),
            "vision_config": {"hidden_size": 32, "image_size": 56, "patch_size": 14}}
    case = _config_case(hf_folder, "config.json", base, data)
    clean(lambda: read_args(find_checkpoint(case)))


@FAST
@given(data=st.data())
def test_params_json(meta_folder: Path, data) -> None:
    case = _config_case(meta_folder, "params.json", {**TINY_PARAMS, "rope_scaling": {"factor": 8.0}}, data)
    clean(lambda: read_args(find_checkpoint(case)))


def _loaders(folder: Path) -> None:
    """Every loader of a model folder: both backends, and `apps.convert`."""
    from backends import available

    from apps.convert import convert

    if "torch" in available():
        from torch_backend import load_model as torch_load

        clean(lambda: torch_load(folder, dtype="float32", device="cpu"))
    if "mlx" in available():
        from mlx_llm import load_model as mlx_load

        clean(lambda: mlx_load(folder, dtype="float32"))
    out = folder.parent / f"{folder.name}-converted"
    shutil.rmtree(out, ignore_errors=True)
    clean(lambda: convert(folder, out))


def _broken_safetensors(raw: bytes, data) -> bytes:
    mode = data.draw(st.sampled_from(["length", "header", "truncate", "bytes"]))
    (n,) = struct.unpack("<Q", raw[:8])
    if mode == "length":
        return struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    if mode == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if mode == "bytes":
        out = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            out[data.draw(st.integers(0, min(len(out), n + 64) - 1))] = data.draw(st.integers(0, 255))
        return bytes(out)
    header = json.loads(raw[8 : 8 + n])
    entry = dict(header[data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))])
    entry = mutate({"e": entry}, data.draw).get("e") if data.draw(st.booleans()) else data.draw(values)
    for key, field in (("dtype", st.sampled_from(["F32", "F16", "Q4", "", "U8", "BF16"])),
                       ("shape", st.lists(st.integers(-2, 2**40), max_size=3)),
                       ("data_offsets", st.lists(st.integers(-5, 2**45), min_size=0, max_size=3))):
        if isinstance(entry, dict) and data.draw(st.integers(0, 3)) == 0:
            entry[key] = data.draw(field)
    header[data.draw(st.sampled_from(sorted(header)))] = entry
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


@SLOW
@given(data=st.data())
def test_safetensors_files(hf_folder: Path, data) -> None:
    from common.files import check_safetensors

    case = _fresh_case(hf_folder, "st")
    path = case / "model.safetensors"
    path.write_bytes(_broken_safetensors(path.read_bytes(), data))
    clean(lambda: check_safetensors(path))
    _loaders(case)


@SLOW
@given(data=st.data())
def test_safetensors_index(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    folder = tmp_path_factory.mktemp("index")
    write_hf(folder, ARGS, random_weights(ARGS, seed=1), shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    kind = data.draw(st.sampled_from(["missing", "elsewhere", "twice", "shape"]))
    if kind == "missing":
        (folder / files[data.draw(st.integers(0, 1))]).unlink()
    elif kind == "elsewhere":
        key = data.draw(st.sampled_from(sorted(index["weight_map"])))
        index["weight_map"][key] = data.draw(st.sampled_from(["../model.safetensors", "/etc/passwd", "x.bin", ""]))
    elif kind == "twice":  # one tensor in both shards
        shutil.copy(folder / files[0], folder / files[1])
    else:
        index["weight_map"] = data.draw(values)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError):
        read_args(find_checkpoint(folder)) if kind != "twice" else None
        _loaders_strict(folder)


def _loaders_strict(folder: Path) -> None:
    from torch_backend import load_model

    load_model(folder, dtype="float32", device="cpu")


@SLOW
@given(data=st.data())
def test_pth_files(meta_folder: Path, data) -> None:
    import torch

    case = _fresh_case(meta_folder, "pth")
    path = case / "consolidated.00.pth"
    kind = data.draw(st.sampled_from(["bytes", "zip", "object", "truncate"]))
    if kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=256)))
    elif kind == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", data.draw(st.binary(max_size=64)))
        path.write_bytes(buf.getvalue())
    else:
        obj = data.draw(st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), values),
                                  st.just({"tok_embeddings.weight": torch.zeros(3, dtype=torch.int32)}),
                                  st.just({"layers.0.attention.wqkv.weight": torch.zeros(2, 2)})))
        torch.save(obj, path)
    _loaders(case)


@pytest.mark.parametrize("pickle_bytes", [b"\x95\x00\x00\x00\x00\x00\x00\x00\x80",  # FRAME of 2**63: OverflowError
                                          b"\x80\x02h\x05.",  # BINGET of an empty memo
                                          b"\x80\x02K\x01K\x02R."])  # REDUCE of an int: TypeError
def test_pth_with_a_damaged_pickle_is_a_clear_error(meta_folder: Path, pickle_bytes: bytes) -> None:
    """Damaged pickles fail in the unpickler with more than UnpicklingError; every loader names the file."""
    case = _fresh_case(meta_folder, "pickle")
    with zipfile.ZipFile(case / "consolidated.00.pth", "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
    _loaders(case)
    from apps.convert_io import PthSource

    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read checkpoint"):
        PthSource(case / "consolidated.00.pth")


@FAST
@given(data=st.data())
def test_tokenizer_files(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    from test_tokenizer import CHAT_SPECIALS, byte_level_json, sp_model_bytes, tiny_ranks, write_tiktoken_file

    from common.tokenizer import load_tokenizer_files

    folder = tmp_path_factory.mktemp("tok")
    kind = data.draw(st.sampled_from(["json", "json-bytes", "sp", "tiktoken"]))
    if kind == "json":
        (folder / "tokenizer.json").write_text(json.dumps(mutate(json.loads(byte_level_json(CHAT_SPECIALS)),
                                                                 data.draw)))
    elif kind == "json-bytes":
        (folder / "tokenizer.json").write_bytes(data.draw(st.binary(max_size=200)))
    elif kind == "sp":
        raw = bytearray(sp_model_bytes())
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        (folder / "tokenizer.model").write_bytes(bytes(raw[: data.draw(st.integers(1, len(raw)))]))
    else:
        path = write_tiktoken_file(folder / "tokenizer.model", tiny_ranks())
        lines = path.read_bytes().splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        lines[i] = data.draw(st.sampled_from([b"", b"!!!! 3", b"QUJD", b"QUJD -1", b"QUJD 99999999999", b"\xff\xfe"]))
        path.write_bytes(b"\n".join(lines))
    clean(lambda: load_tokenizer_files(folder))


def _png(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@FAST
@given(data=st.data())
def test_image_files(tmp_path_factory: pytest.TempPathFactory, data) -> None:
    from PIL import Image

    from common.image import preprocess_image

    path = tmp_path_factory.mktemp("img") / "x.png"
    kind = data.draw(st.sampled_from(["bytes", "truncated", "bomb", "garbled"]))
    if kind == "bytes":
        path.write_bytes(data.draw(st.binary(max_size=300)))
    elif kind == "bomb":  # a few hundred bytes claiming up to 4 billion pixels
        path.write_bytes(_png(data.draw(st.integers(1, 65535)), data.draw(st.integers(1, 65535))))
    else:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
        raw = bytearray(buf.getvalue())
        if kind == "truncated":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 6))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(raw))
    clean(lambda: preprocess_image(path, 56))


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(hf_folder: Path) -> None:
    from common.files import ModelFolderError
    from torch_backend import load_model

    case = _fresh_case(hf_folder, "huge")
    config = json.loads((case / "config.json").read_text())
    config["vocab_size"] = 50_000_000  # 50M x 64 float32: 12.8 GB for a 1 MB checkpoint
    (case / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="far more than"):
        load_model(case, dtype="float32", device="cpu")


def test_programs_report_a_broken_file_in_one_line(hf_folder: Path, capsys: pytest.CaptureFixture) -> None:
    from apps.convert import main as convert_main
    from apps.generate import main as generate_main

    case = _fresh_case(hf_folder, "cli")
    raw = (case / "model.safetensors").read_bytes()
    (case / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    assert generate_main(["--model", str(case), "--backend", "torch", "--max-tokens", "2"]) == 1
    assert convert_main(["--model", str(case), "--out", str(case.parent / "case-cli-out")]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and all("model.safetensors" in ln for ln in lines)
