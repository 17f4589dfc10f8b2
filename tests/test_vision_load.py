"""Vision configs and checkpoints (HF and Meta native with model-parallel shards), generation with
images, and `apps.generate --image`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from folders import TINY_PARAMS, write_hf
from PIL import Image
from test_load import _load
from test_tokenizer import tiny_ranks, write_tiktoken_file
from test_vision import ARGS, TOKENS, VISION, WEIGHTS, features, hf_vision_state, masked_embedding
from test_vision import vision_weights as make_weights
from tiny import random_weights, tiny_args

from common.args import ModelArgs, VisionArgs
from common.checkpoint import (
    CheckpointError,
    canonical_to_hf,
    canonical_to_meta,
    checked_items,
    hf_to_canonical,
    meta_shards_to_canonical,
)
from common.sampling import SamplingParams

SCOUT_VISION_PARAMS = {"image_size": {"height": 336, "width": 336}, "patch_size": {"height": 14, "width": 14},
                       "dim": 1408, "n_layers": 34, "n_heads": 16, "mlp_ratio": 4.0, "output_dim": 4096,
                       "pixel_shuffle_ratio": 0.5}
SCOUT_VISION_CONFIG = {  # vision_config of the released Llama-4-Scout config.json
    "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
    "initializer_range": 0.02, "intermediate_size": 5632, "model_type": "llama4_vision_model",
    "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3,
    "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0,
    "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000,
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "vision_output_dim": 4096,
}
META_VISION = {"image_size": {"height": 56, "width": 56}, "patch_size": {"height": 14, "width": 14}, "dim": 32,
               "n_layers": 2, "n_heads": 2, "mlp_ratio": 4.0, "output_dim": 48, "pixel_shuffle_ratio": 0.5}
META_PARAMS = {**TINY_PARAMS, "vision_args": META_VISION}


def test_vision_args_from_both_config_formats() -> None:
    scout = VisionArgs.from_params(SCOUT_VISION_PARAMS)
    assert scout == VisionArgs() == VisionArgs.from_hf_config(SCOUT_VISION_CONFIG)
    assert (scout.tokens_per_tile, scout.adapter_dim, scout.hidden_dim, scout.head_dim) == (144, 5632, 5632, 88)
    assert VisionArgs.from_hf_config(VISION.to_hf_config()) == VISION
    assert VisionArgs.from_params(META_VISION) == VISION
    theta = {**SCOUT_VISION_CONFIG, "rope_parameters": {"rope_theta": 500.0}}  # transformers 5 form
    assert VisionArgs.from_hf_config(theta).rope_theta == 500


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image_size": [336, 448]}, "image_size"),
        ({"intermediate_size": 4224}, "intermediate_size"),
        ({"projector_output_dim": 2048}, "vision_output_dim"),
        ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio"),
        ({"num_attention_heads": 64}, "divide by 4"),  # head_dim 22: 2-D RoPE needs quarters
    ],
)
def test_bad_vision_configs_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VisionArgs.from_hf_config({**SCOUT_VISION_CONFIG, **change})


def test_missing_params_field_is_named() -> None:
    with pytest.raises(ValueError, match="vision_args.output_dim"):
        VisionArgs.from_params({k: v for k, v in SCOUT_VISION_PARAMS.items() if k != "output_dim"})


def test_hf_names_round_trip() -> None:
    hf = canonical_to_hf(WEIGHTS, ARGS, conditional=True)
    vision = {k for k in hf if not k.startswith("language_model.")}
    assert vision == set(hf_vision_state(WEIGHTS))  # the library's names are transformers' names
    back = hf_to_canonical(dict(hf), ARGS)
    assert list(back) == list(WEIGHTS)
    for name, x in WEIGHTS.items():
        np.testing.assert_array_equal(back[name], x)
    assert not any(k.startswith("vision") for k in canonical_to_hf(WEIGHTS, ARGS))  # CausalLM: text only


def test_partial_vision_checkpoint_is_rejected() -> None:
    hf = dict(canonical_to_hf(WEIGHTS, ARGS, conditional=True))
    del hf["vision_model.model.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"resblocks\.1\.mlp\.c_proj\.bias"):
        list(checked_items(hf_to_canonical(hf, ARGS), ARGS))
    hf["vision_model.model.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)  # a third ViT layer
    with pytest.raises(CheckpointError, match=r"unexpected.*resblocks\.2\.mlp\.c_proj\.bias"):
        list(checked_items(hf_to_canonical(hf, ARGS), ARGS))


def test_meta_shards_split_and_merge_by_the_reference_rules() -> None:
    args = ModelArgs.from_params(META_PARAMS)
    weights = make_weights(args, seed=5)
    shards = canonical_to_meta(weights, args, n_shards=2)
    block = "vision_embeddings.vision_encoder.transformer.resblocks.0."
    rows = [block + "attn.wq.weight", block + "attn.wk.bias", block + "mlp.c_fc.weight", "vision_projection.weight",
            "vision_embeddings.vision_encoder.conv1._linear.weight", "vision_embeddings.vision_adapter.mlp.c_fc.weight"]
    cols = [block + "attn.wo.weight", block + "mlp.c_proj.weight", "vision_embeddings.vision_adapter.mlp.c_proj.weight"]
    enc = "vision_embeddings.vision_encoder."
    same = [block + "attn.wo.bias", block + "mlp.c_proj.bias", block + "ln_1.weight", enc + "positional_embedding_vlm",
            enc + "class_embedding", enc + "ln_post.bias"]
    for r, shard in enumerate(shards):
        for name in rows:  # column-parallel: rank r holds the r-th half of the output rows
            n = weights[name].shape[0] // 2
            np.testing.assert_array_equal(shard[name], weights[name][r * n:(r + 1) * n])
        for name in cols:  # row-parallel: the r-th half of the input columns
            n = weights[name].shape[1] // 2
            np.testing.assert_array_equal(shard[name], weights[name][:, r * n:(r + 1) * n])
        for name in same:
            np.testing.assert_array_equal(shard[name], weights[name])
    merged = meta_shards_to_canonical(shards, args)
    assert set(merged) == set(weights)
    for name, x in weights.items():
        np.testing.assert_array_equal(merged[name], x)


def _write_meta(folder: Path, weights: dict[str, np.ndarray], args: ModelArgs, shards: int) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(META_PARAMS))
    for rank, sd in enumerate(canonical_to_meta(weights, args, n_shards=shards)):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                   folder / f"consolidated.{rank:02d}.pth")
    return folder


def _write_vision_hf(folder: Path, args: ModelArgs, weights: dict[str, np.ndarray]) -> Path:
    write_hf(folder, args, weights, conditional=True)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"] = args.vision_args.to_hf_config()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _same_outputs(backend, loaded, args: ModelArgs, weights: dict[str, np.ndarray]) -> None:
    direct = backend.build(args, weights)
    np.testing.assert_array_equal(features(backend, loaded), features(backend, direct))
    emb = masked_embedding(backend, features(backend, direct))
    np.testing.assert_array_equal(backend.forward(loaded, TOKENS, image_embedding=emb),
                                  backend.forward(direct, TOKENS, image_embedding=emb))


def test_hf_folder_with_vision(backend, tmp_path: Path) -> None:
    model = _load(backend, _write_vision_hf(tmp_path, ARGS, WEIGHTS))
    assert model.args.vision_args == VISION
    _same_outputs(backend, model, ARGS, WEIGHTS)


def test_meta_folder_with_vision_shards(backend, tmp_path: Path) -> None:
    args = ModelArgs.from_params(META_PARAMS)
    weights = make_weights(args, seed=6)
    _same_outputs(backend, _load(backend, _write_meta(tmp_path, weights, args, shards=2)), args, weights)


def test_text_only_conversion_keeps_loading(backend, tmp_path: Path) -> None:
    # mlx-lm drops the vision tower but keeps vision_config: such a folder loads as the text model.
    text_args, text_weights = tiny_args(), random_weights(tiny_args(), seed=7)
    write_hf(tmp_path, text_args, text_weights, conditional=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_config": VISION.to_hf_config()}))
    model = _load(backend, tmp_path)
    assert model.args.vision_args is None and not hasattr(model, "vision_embeddings")
    direct = backend.build(text_args, text_weights)
    np.testing.assert_array_equal(backend.forward(model, TOKENS), backend.forward(direct, TOKENS))


def _tokenizer_folder(folder: Path):
    from common.tiktoken_tokenizer import TiktokenTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    return TiktokenTokenizer.from_file(write_tiktoken_file(folder / "tokenizer.model", tiny_ranks()))


def _pictures(folder: Path) -> list[Path]:
    rng = np.random.default_rng(8)
    paths = [folder / "a.png", folder / "b.png"]
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[0])  # one tile
    Image.fromarray(rng.integers(0, 256, (50, 100, 3), dtype=np.uint8)).save(paths[1])  # 1 x 2 tiles + global
    return paths


def test_generate_with_images(backend, tmp_path: Path) -> None:
    tok = _tokenizer_folder(tmp_path)
    args = dataclasses.replace(ARGS, vocab_size=tok.vocab_size)
    model = backend.build(args, make_weights(args, seed=9))
    mod = __import__("mlx_llm" if backend.name == "mlx" else "torch_backend")
    greedy = SamplingParams(temperature=0.0)
    images = _pictures(tmp_path)
    runs = [[r.token for r in mod.stream_generate(model, tok, "Hi", 3, greedy, prefill_step_size=step, images=images)]
            for step in (512, 5)]  # 5: image rows split across prefill chunks
    assert runs[0] == runs[1]
    from common.image_prompt import prepare_prompt

    ids, found = prepare_prompt(tok, "Hi", images, VISION)
    assert ids.count(tok.special_tokens["<|patch|>"]) == 4 * 4  # 1 tile + (2 tiles + global view)
    tokens = np.array([ids])
    emb = masked_embedding(backend, features(backend, model, found.pixels), tokens, tok.special_tokens["<|patch|>"])
    logits = backend.forward(model, tokens, image_embedding=emb)
    assert runs[0][0] == int(np.argmax(logits[0, -1]))
    with pytest.raises(ValueError, match="2 image"):
        list(mod.stream_generate(model, tok, ids, 2, greedy, images=images[:1]))
    text = backend.build(dataclasses.replace(args, vision_args=None), random_weights(dataclasses.replace(
        args, vision_args=None)))
    with pytest.raises(ValueError, match="vision encoder"):
        list(mod.stream_generate(text, tok, "Hi", 2, greedy, images=images))


def test_cli_with_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("torch")
    from apps.generate import main

    tok = _tokenizer_folder(tmp_path / "model")
    args = dataclasses.replace(ARGS, vocab_size=tok.vocab_size)
    folder = _write_vision_hf(tmp_path / "model", args, make_weights(args, seed=10))
    a, b = _pictures(tmp_path)
    base = ["--model", str(folder), "--backend", "torch", "--device", "cpu", "--max-tokens", "2"]
    assert main([*base, "--prompt", "Hi", "--image", str(a), "--image", str(b)]) == 0
    assert main([*base, "--no-chat-template", "--prompt", "Hi", "--image", str(a)]) == 0
    capsys.readouterr()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert main([*base, "--prompt", "Hi", "--image", str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "bad.png" in err
