"""The vision path on both backends: image features and merged text+image logits against HF
transformers' Llama 4 (vision tower, projector, language model), MLX vs torch, and merge errors."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from backends import available, make
from hf_ref import hf_config, hf_state_dict
from PIL import Image
from tiny import random_weights, tiny_args

from common.args import ModelArgs, VisionArgs
from common.chat_format import image_tokens
from common.datatypes import MaskedEmbedding
from common.image import preprocess_image
from common.names import canonical_shapes

VISION = VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, mlp_ratio=4.0, output_dim=48)
ARGS = dataclasses.replace(tiny_args(), vision_args=VISION)
SPECIALS = {"<|image_start|>": 120, "<|image_end|>": 121, "<|image|>": 122, "<|patch|>": 123,
            "<|tile_x_separator|>": 124, "<|tile_y_separator|>": 125}
PATCH = SPECIALS["<|patch|>"]


def vision_weights(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical weights with O(1) image features: LayerNorm gains near 1, fan-in scaled linears."""
    w = random_weights(args, seed)
    rng = np.random.default_rng(seed + 1)
    for name, x in w.items():
        if not name.startswith(("vision_embeddings.", "vision_projection.")):
            continue
        if re.search(r"ln_\w+\.weight$", name):
            w[name] = rng.uniform(0.6, 1.4, x.shape).astype(np.float32)
        elif name.endswith(("bias", "class_embedding", "positional_embedding_vlm")):
            w[name] = (rng.standard_normal(x.shape) * 0.3).astype(np.float32)
        else:
            w[name] = (rng.standard_normal(x.shape) / np.sqrt(x.shape[1])).astype(np.float32)
    return w


WEIGHTS = vision_weights(ARGS)


def _images() -> list[tuple[np.ndarray, tuple[int, int]]]:
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))  # one tile
    large = Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8))  # 2 x 2 tiles + global view
    return [preprocess_image(img, tile_size=56) for img in (small, large)]


IMAGES = _images()
PIXELS = np.concatenate([tiles for tiles, _ in IMAGES])  # [6, 3, 56, 56]
TOKENS = np.array([[0, 7, 8, *image_tokens(IMAGES[0][1], 4, SPECIALS), 9, 10, 11,
                    *image_tokens(IMAGES[1][1], 4, SPECIALS), 12, 13, 14]])


def hf_vision_state(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Canonical vision tensors -> Llama4ForConditionalGeneration names, written apart from the library."""
    renames = [
        ("vision_projection.weight", "multi_modal_projector.linear_1.weight"),
        ("vision_embeddings.vision_adapter.mlp.c_fc.", "vision_model.vision_adapter.mlp.fc1."),
        ("vision_embeddings.vision_adapter.mlp.c_proj.", "vision_model.vision_adapter.mlp.fc2."),
        ("vision_embeddings.vision_encoder.conv1._linear.", "vision_model.patch_embedding.linear."),
        ("vision_embeddings.vision_encoder.ln_pre.", "vision_model.layernorm_pre."),
        ("vision_embeddings.vision_encoder.ln_post.", "vision_model.layernorm_post."),
        ("vision_embeddings.vision_encoder.transformer.resblocks.", "vision_model.model.layers."),
        ("vision_embeddings.vision_encoder.", "vision_model."),
        (".attn.wq.", ".self_attn.q_proj."), (".attn.wk.", ".self_attn.k_proj."),
        (".attn.wv.", ".self_attn.v_proj."), (".attn.wo.", ".self_attn.o_proj."),
        (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
        (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
    ]
    out = {}
    for name, x in weights.items():
        if not name.startswith(("vision_embeddings.", "vision_projection.")):
            continue
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = torch.from_numpy(np.ascontiguousarray(x))
    return out


@pytest.fixture(scope="module")
def hf():
    """A float32 Llama4ForConditionalGeneration (eager attention) holding WEIGHTS."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4VisionConfig

    vision = Llama4VisionConfig(**{k: v for k, v in VISION.to_hf_config().items() if k != "model_type"})
    config = Llama4Config(text_config=hf_config(ARGS), vision_config=vision, attn_implementation="eager")
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config).float().eval()
    state = {"language_model." + k: v for k, v in hf_state_dict(ARGS, WEIGHTS).items()}
    model.load_state_dict({**state, **hf_vision_state(WEIGHTS)}, strict=True)
    return model


def hf_features(hf) -> np.ndarray:
    with torch.inference_mode():
        return hf.vision_model(torch.from_numpy(PIXELS)).last_hidden_state.numpy()


def hf_merged_logits(hf) -> np.ndarray:
    """transformers 5.24's forward with pixel_values raises, so the vision tower, projector and
    scatter run here, and the language model takes the merged embeddings."""
    ids = torch.from_numpy(TOKENS)
    with torch.inference_mode():
        feats = hf.vision_model(torch.from_numpy(PIXELS)).last_hidden_state
        projected = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))  # [T*P, D]
        embeds = hf.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == PATCH)[..., None], projected)
        return hf.language_model(inputs_embeds=embeds, use_cache=False).logits.float().numpy()


def masked_embedding(backend, feats: np.ndarray, tokens: np.ndarray = TOKENS, patch: int = PATCH) -> MaskedEmbedding:
    """Feature rows [T, P, O] scattered, in order, to the <|patch|> positions of `tokens` [1, L]."""
    mask = tokens == patch  # [1, L]
    emb = np.zeros((*tokens.shape, feats.shape[-1]), np.float32)
    emb[mask] = feats.reshape(-1, feats.shape[-1])
    return MaskedEmbedding(embedding=backend.from_numpy(emb), mask=backend.from_numpy(mask[..., None]))


def features(backend, model, pixels: np.ndarray = PIXELS) -> np.ndarray:
    if backend.name == "torch":
        with torch.inference_mode():
            return backend.to_numpy(model.vision_embeddings(backend.from_numpy(pixels)))
    return backend.to_numpy(model.vision_embeddings(backend.from_numpy(pixels)))


def merged_logits(backend, model) -> np.ndarray:
    return backend.forward(model, TOKENS, image_embedding=masked_embedding(backend, features(backend, model)))


def test_image_features_match_transformers(backend, hf) -> None:
    got, want = features(backend, backend.build(ARGS, WEIGHTS)), hf_features(hf)
    assert got.shape == want.shape == (6, VISION.tokens_per_tile, VISION.output_dim)
    assert np.abs(want).max() > 0.5  # features of real size, so the tolerance means something
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # measured: 1.9e-6 (torch), 1.9e-6 (mlx)


def test_merged_logits_match_transformers(backend, hf) -> None:
    model = backend.build(ARGS, WEIGHTS)
    got, want = merged_logits(backend, model), hf_merged_logits(hf)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    text_only = backend.forward(model, TOKENS)
    patch = (TOKENS == PATCH)[0]
    assert np.abs(text_only[0, patch] - got[0, patch]).max() > 0.1  # the images did change the logits
    np.testing.assert_array_equal(text_only[0, :3], got[0, :3])  # and nothing before the first image


@pytest.mark.skipif(available() != ["mlx", "torch"], reason="needs both backends")
def test_backends_agree_on_two_image_prompt() -> None:
    mlx, pt = make("mlx"), make("torch")
    m_model, t_model = mlx.build(ARGS, WEIGHTS), pt.build(ARGS, WEIGHTS)
    np.testing.assert_allclose(features(mlx, m_model), features(pt, t_model), rtol=0, atol=1e-4)
    np.testing.assert_allclose(merged_logits(mlx, m_model), merged_logits(pt, t_model), rtol=0, atol=1e-4)


@pytest.mark.skipif(available() != ["mlx", "torch"], reason="needs both backends")
def test_parameter_names_equal_across_backends() -> None:
    from mlx.utils import tree_flatten

    from mlx_llm.model import Transformer as MlxTransformer
    from torch_backend.model import Transformer as TorchTransformer

    mlx_shapes = {k: tuple(v.shape) for k, v in tree_flatten(MlxTransformer(ARGS).parameters())}
    torch_shapes = {k: tuple(v.shape) for k, v in TorchTransformer(ARGS).state_dict().items()}
    assert mlx_shapes == torch_shapes == canonical_shapes(ARGS)
    assert "vision_embeddings.vision_encoder.conv1._linear.weight" in mlx_shapes


def test_merge_checks(backend) -> None:
    model = backend.build(ARGS, WEIGHTS)
    feats = features(backend, model)
    bad = MaskedEmbedding(embedding=backend.from_numpy(np.zeros((1, 5, 48), np.float32)),
                          mask=backend.from_numpy(np.zeros((1, 5, 1), bool)))
    with pytest.raises(ValueError, match=re.escape(f"expected embedding [1, {TOKENS.shape[1]}, 48]")):
        backend.forward(model, TOKENS, image_embedding=bad)
    text = backend.build(tiny_args(), random_weights(tiny_args()))
    with pytest.raises(ValueError, match="no vision encoder"):
        backend.forward(text, TOKENS, image_embedding=masked_embedding(backend, feats))
    with pytest.raises(ValueError, match=r"pixels \[N, 3, 56, 56\]"):
        features(backend, model, np.zeros((2, 3, 28, 28), np.float32))


def test_many_tiles_in_one_call(backend) -> None:
    # The reference caps a call at 32 tiles (its KV cache); here any number goes, each tile independent.
    model = backend.build(ARGS, WEIGHTS)
    many = features(backend, model, np.concatenate([PIXELS] * 7))  # 42 tiles
    np.testing.assert_allclose(many, np.concatenate([features(backend, model)] * 7), rtol=0, atol=1e-5)


# Measured max |diff| from float32: features 0.017 (both backends), logits 0.076 (mlx), 0.050 (torch).
def test_bfloat16_close_to_float32(backend) -> None:
    full, half = backend.build(ARGS, WEIGHTS), backend.build(ARGS, WEIGHTS, "bfloat16")
    raw = half.vision_embeddings(backend.from_numpy(PIXELS))
    assert "bfloat16" in str(raw.dtype)
    assert np.abs(features(backend, half) - features(backend, full)).max() < 0.04
    assert np.abs(merged_logits(backend, half) - merged_logits(backend, full)).max() < 0.15
