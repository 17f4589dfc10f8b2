"""Loading every folder layout on both backends, and clear errors for broken folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from folders import TINY_PARAMS, meta_args, write_hf, write_meta
from tiny import random_weights, tiny_args

TOKENS = np.array([[5, 17, 99, 3, 42, 8, 1, 64, 100, 7, 21, 33, 2, 90, 11, 6, 50, 77, 3, 12]])


def _load(backend, path: Path, dtype: str = "float32"):
    if backend.name == "mlx":
        from mlx_llm import load_model
    else:
        from torch_backend import load_model
    kwargs = {} if backend.name == "mlx" else {"device": "cpu"}
    return load_model(path, dtype=dtype, **kwargs)


def _same_logits(backend, loaded, args, weights) -> None:
    direct = backend.build(args, weights)
    np.testing.assert_array_equal(backend.forward(loaded, TOKENS), backend.forward(direct, TOKENS))


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder(backend, tmp_path: Path, shards: int) -> None:
    args = tiny_args()
    weights = random_weights(args, seed=1)
    model = _load(backend, write_hf(tmp_path, args, weights, shards=shards))
    _same_logits(backend, model, args, weights)


def test_conditional_generation_folder(backend, tmp_path: Path) -> None:
    args = tiny_args()
    weights = random_weights(args, seed=2)
    vision = {"vision_model.class_embedding": np.zeros(8, np.float32),
              "multi_modal_projector.linear_1.weight": np.zeros((64, 8), np.float32)}
    model = _load(backend, write_hf(tmp_path, args, weights, conditional=True, extra=vision))
    _same_logits(backend, model, args, weights)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_meta_native_folder(backend, tmp_path: Path, shards: int) -> None:
    args = meta_args()
    weights = random_weights(args, seed=3)
    model = _load(backend, write_meta(tmp_path, weights, shards=shards))
    _same_logits(backend, model, args, weights)


def test_dtype_on_load(backend, tmp_path: Path) -> None:
    args = tiny_args()
    weights = random_weights(args, seed=4)
    path = write_hf(tmp_path, args, weights)
    full = backend.forward(_load(backend, path), TOKENS)
    half = backend.forward(_load(backend, path, "bfloat16"), TOKENS)
    assert np.abs(full - half).max() < 0.25  # bf16 keeps ~3 significant digits through 4 layers
    assert np.abs(full - half).max() > 0  # and really ran in bf16


def _error(backend, path: Path) -> str:
    with pytest.raises(ValueError) as info:
        _load(backend, path)
    return str(info.value)


def test_missing_key(backend, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    args = tiny_args()
    write_hf(tmp_path, args, random_weights(args))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert "layers.2.attention.wk.weight" in _error(backend, tmp_path)


def test_unexpected_key(backend, tmp_path: Path) -> None:
    args = tiny_args()
    write_hf(tmp_path, args, random_weights(args), extra={"model.layers.0.mystery.weight": np.zeros(3, np.float32)})
    assert "model.layers.0.mystery.weight" in _error(backend, tmp_path)


def test_wrong_shape(backend, tmp_path: Path) -> None:
    args = tiny_args()
    weights = random_weights(args)
    weights["layers.1.attention.wo.weight"] = np.zeros((64, 32), np.float32)
    msg = _error(backend, write_hf(tmp_path, args, weights))
    assert "wo" in msg or "o_proj" in msg
    assert "64, 64" in msg and "64, 32" in msg


def test_truncated_safetensors(backend, tmp_path: Path) -> None:
    args = tiny_args()
    write_hf(tmp_path, args, random_weights(args))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msg = _error(backend, tmp_path)
    assert "model.safetensors" in msg and "truncated" in msg


def test_params_without_n_kv_heads(backend, tmp_path: Path) -> None:
    weights = random_weights(meta_args())
    params = {k: v for k, v in TINY_PARAMS.items() if k != "n_kv_heads"}
    msg = _error(backend, write_meta(tmp_path, weights, params=params))
    assert "params.json" in msg and "n_kv_heads" in msg


def test_unknown_model_type(backend, tmp_path: Path) -> None:
    args = tiny_args()
    write_hf(tmp_path, args, random_weights(args))
    config = json.loads((tmp_path / "config.json").read_text()) | {"model_type": "mistral"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    msg = _error(backend, tmp_path)
    assert "model_type" in msg and "mistral" in msg


def test_empty_and_missing_folder(backend, tmp_path: Path) -> None:
    assert "no model found" in _error(backend, tmp_path)
    assert "not found" in _error(backend, tmp_path / "nope")


def test_corrupt_pth(backend, tmp_path: Path) -> None:
    write_meta(tmp_path, random_weights(meta_args()))
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip archive")
    msg = _error(backend, tmp_path)
    assert "consolidated.00.pth" in msg
