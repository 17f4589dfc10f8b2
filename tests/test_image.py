"""Image preprocessing, the image token layout and image prompts: pure numpy / Pillow, no model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.args import VisionArgs
from common.chat_format import ChatFormat, image_tokens
from common.image import ImageError, plan_tiles, preprocess_image, supported_canvases
from common.image_prompt import prepare_prompt, prompt_images

# Reference §5.1, from a run of Meta's transform: image (w, h) -> canvas, resized, (rows, cols), <|patch|> tokens
TABLE = [
    ((100, 100), (336, 336), (336, 336), (1, 1), 144),
    ((500, 375), (672, 672), (500, 375), (2, 2), 720),
    ((800, 300), (1008, 336), (800, 300), (1, 3), 576),
    ((1024, 768), (1344, 1008), (1024, 768), (3, 4), 1872),
    ((1920, 1080), (1680, 1008), (1680, 945), (3, 5), 2304),
    ((300, 2000), (336, 2016), (300, 2000), (6, 1), 1008),
    ((4000, 200), (4032, 336), (4000, 200), (1, 12), 1872),
    ((337, 336), (672, 336), (337, 336), (1, 2), 432),
]
SPECIALS = {"<|image_start|>": 1, "<|image_end|>": 2, "<|image|>": 3, "<|patch|>": 4, "<|tile_x_separator|>": 5,
            "<|tile_y_separator|>": 6}
TINY_VISION = VisionArgs(image_size=56, patch_size=14, dim=32, n_layers=2, n_heads=2, output_dim=48)


def _norm(u8: np.ndarray) -> np.ndarray:
    """The reference's ToTensor + Normalize(0.5, 0.5) of uint8 [H, W, 3], as [3, H, W]."""
    return ((u8.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)


@pytest.mark.parametrize(("size", "canvas", "resized", "grid", "tokens"), TABLE)
def test_tiling_table(size, canvas, resized, grid, tokens) -> None:
    plan = plan_tiles(size)
    assert (plan.canvas, plan.resized, plan.grid) == (canvas, resized, grid)
    assert image_tokens(plan.grid, 144, SPECIALS).count(SPECIALS["<|patch|>"]) == tokens == plan.n_tiles * 144


def test_canvases_in_reference_order() -> None:
    canvases = supported_canvases()
    assert len(canvases) == 50 and len(set(canvases)) == 50
    assert {(h, w) for w, h in canvases} == set(canvases)  # symmetric, so (w, h) vs (h, w) cannot matter
    # n = 16 opens the ratio groups 1/16, 2/8, 4/4, 8/2, 16/1; later n join them: 1x4 the 1/4 group,
    # 3x3, 2x2 and 1x1 the square group.
    assert canvases[:7] == [(336, 5376), (672, 2688), (336, 1344), (1344, 1344), (1008, 1008), (672, 672),
                            (336, 336)]


def test_exact_tile_is_only_normalised() -> None:
    u8 = np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    tiles, grid = preprocess_image(Image.fromarray(u8))
    assert grid == (1, 1) and tiles.shape == (1, 3, 336, 336) and tiles.dtype == np.float32
    np.testing.assert_array_equal(tiles[0], _norm(u8))
    np.testing.assert_allclose(tiles[0], u8.transpose(2, 0, 1) * (2 / 255) - 1, atol=1e-6)


def test_wide_image_tiles_padding_and_global_view() -> None:
    u8 = np.random.default_rng(1).integers(0, 256, (200, 400, 3), dtype=np.uint8)  # 400 wide, 200 high
    img = Image.fromarray(u8)
    assert plan_tiles(img.size).canvas == (672, 336)  # not resized: 400 > 336 and 200 fits
    tiles, grid = preprocess_image(img)
    assert grid == (1, 2) and tiles.shape == (3, 3, 336, 336)
    x = _norm(u8)
    np.testing.assert_array_equal(tiles[0, :, :200], x[:, :, :336])  # pasted top-left
    np.testing.assert_array_equal(tiles[1, :, :200, :64], x[:, :, 336:])
    assert (tiles[0, :, 200:] == -1).all() and (tiles[1, :, :, 64:] == -1).all()  # black padding
    whole = np.asarray(img.resize((336, 336), Image.Resampling.BILINEAR))  # global view: distorting resize
    np.testing.assert_array_equal(tiles[2], _norm(whole))


def test_quadrants_are_row_major() -> None:
    colors = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]], dtype=np.uint8)
    u8 = np.zeros((672, 672, 3), dtype=np.uint8)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        u8[r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] = colors[k]
    tiles, grid = preprocess_image(Image.fromarray(u8))
    assert grid == (2, 2) and len(tiles) == 5
    for k in range(4):
        np.testing.assert_array_equal(tiles[k], np.broadcast_to(_norm(colors[k][None, None]), (3, 336, 336)))
    np.testing.assert_array_equal(tiles[4, :, 0, 0], _norm(colors[0][None, None])[:, 0, 0])  # global view corner
    np.testing.assert_array_equal(tiles[4, :, -1, -1], _norm(colors[3][None, None])[:, 0, 0])


def test_small_image_upscaled_to_one_tile_side() -> None:
    u8 = np.full((50, 100, 3), 200, dtype=np.uint8)
    tiles, grid = preprocess_image(Image.fromarray(u8))
    assert grid == (1, 1) and tiles.shape == (1, 3, 336, 336)
    np.testing.assert_allclose(tiles[0, :, :168], 200 / 255 * 2 - 1, atol=1e-6)  # resized to 336 x 168
    assert (tiles[0, :, 168:] == -1).all()


def test_rgba_on_white_and_other_modes() -> None:
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, 28:, 3] = 255
    rgba[:8, :8, 3] = 128
    tiles, _ = preprocess_image(Image.fromarray(rgba, "RGBA"), tile_size=56)
    np.testing.assert_array_equal(tiles[0, :, 20:, :28], 1.0)  # transparent -> white
    np.testing.assert_allclose(tiles[0, :, 0, 40], _norm(np.array([[[10, 20, 30]]], np.uint8))[:, 0, 0])
    half = (np.array([10, 20, 30]) * 128 + 255 * 127) / 255 / 255 * 2 - 1
    np.testing.assert_allclose(tiles[0, :, 0, 0], half, atol=2 / 255)
    gray, _ = preprocess_image(Image.fromarray(np.full((56, 56), 51, np.uint8), "L"), tile_size=56)
    np.testing.assert_allclose(gray, 51 / 255 * 2 - 1, atol=1e-6)


def test_image_files_and_clear_errors(tmp_path: Path) -> None:
    u8 = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "ok.png")
    from_file, _ = preprocess_image(tmp_path / "ok.png", tile_size=56)
    np.testing.assert_array_equal(from_file, preprocess_image(Image.fromarray(u8), tile_size=56)[0])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:80])
    for name, reason in [("junk.png", "not an image"), ("cut.png", "cannot decode"), ("none.png", "not found")]:
        with pytest.raises(ImageError, match=reason) as err:
            preprocess_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_image_token_layout() -> None:
    t = SPECIALS
    assert image_tokens((1, 1), 2, t) == [1, 3, 4, 4, 2]
    one_row = [1, 4, 4, 5, 4, 4, 6, 3, 4, 4, 2]  # start, tile, x-sep, tile, y-sep, <|image|>, global, end
    assert image_tokens((1, 2), 2, t) == one_row
    assert image_tokens((2, 1), 1, t) == [1, 4, 6, 4, 6, 3, 4, 2]
    with pytest.raises(ValueError, match="image tokens"):
        image_tokens((1, 1), 2, {"<|patch|>": 4})


def test_prompt_images_checks_counts() -> None:
    one, five = np.zeros((1, 3, 56, 56), np.float32), np.zeros((5, 3, 56, 56), np.float32)
    ids = [0, *image_tokens((1, 1), 4, SPECIALS), 9, *image_tokens((2, 2), 4, SPECIALS), 9]
    got = prompt_images(ids, [one, five], SPECIALS, TINY_VISION)
    assert got.pixels.shape == (6, 3, 56, 56) and got.n_rows == 24
    assert list(got.positions[:4]) == [3, 4, 5, 6]
    rows = got.rows(4, 4)  # positions 4..7: patches 1, 2, 3 of image 1, then <|image_end|>
    assert list(rows) == [1, 2, 3, 24]
    with pytest.raises(ValueError, match=r"holds 1 image\(s\)"):
        prompt_images([0, *image_tokens((1, 1), 4, SPECIALS)], [one, five], SPECIALS, TINY_VISION)
    with pytest.raises(ValueError, match=re.escape("image 2: the prompt has 20 <|patch|> tokens, but its 1 tile")):
        prompt_images(ids, [one, one], SPECIALS, TINY_VISION)
    with pytest.raises(ValueError, match="outside"):
        prompt_images([*ids, 4], [one, five], SPECIALS, TINY_VISION)
    with pytest.raises(ValueError, match=r"tiles \[N, 3, 56, 56\]"):
        prompt_images(ids, [one, np.zeros((5, 3, 336, 336))], SPECIALS, TINY_VISION)


def _tokenizer(tmp_path: Path):
    from test_tokenizer import tiny_ranks, write_tiktoken_file

    from common.tiktoken_tokenizer import TiktokenTokenizer

    return TiktokenTokenizer.from_file(write_tiktoken_file(tmp_path / "tokenizer.model", tiny_ranks()))


def test_chat_and_plain_prompts_with_images(tmp_path: Path) -> None:
    tok = _tokenizer(tmp_path)
    sp = tok.special_tokens
    img = Image.fromarray(np.full((50, 100, 3), 90, np.uint8))  # 100 x 50 at tile 56 -> 1 x 2 tiles
    layout = image_tokens((1, 2), 4, sp)
    chat = ChatFormat(tok, TINY_VISION)
    msg = {"role": "user", "content": [{"type": "image", "image": img}, "Hi"]}
    ids, images = chat.encode_dialog([msg])
    assert ids == [sp["<|begin_of_text|>"], *chat.encode_header("user"), *layout, *tok.encode("Hi", bos=False),
                   sp["<|eot|>"], *chat.encode_header("assistant")]
    assert len(images) == 1 and images[0].shape == (3, 3, 56, 56)
    assert chat.encode_dialog_prompt([msg]) == ids
    with pytest.raises(ValueError, match="user messages"):
        chat.encode_dialog([{"role": "assistant", "content": [{"type": "image", "image": img}]}])
    with pytest.raises(ValueError, match="vision encoder"):
        ChatFormat(tok).encode_dialog([msg])
    plain, found = prepare_prompt(tok, "Hi", [img], TINY_VISION)
    assert plain == [tok.bos_id, *layout, *tok.encode("Hi", bos=False)]
    np.testing.assert_array_equal(found.pixels, images[0])
    same, again = prepare_prompt(tok, plain, images, TINY_VISION)  # ids + preprocessed tiles
    assert same == plain and list(again.positions) == list(found.positions)
    with pytest.raises(ValueError, match="2 image"):
        prepare_prompt(tok, plain, [img, img], TINY_VISION)
    with pytest.raises(ValueError, match="vision encoder"):
        prepare_prompt(tok, "Hi", [img], None)
    assert prepare_prompt(tok, "Hi", None, None) == (tok.encode("Hi"), None)
