"""Images in a prompt: a plain prompt with images, the check of its `<|patch|>` tokens against the
images' tiles, and which image feature row fills each prompt position.

The vision encoder turns every tile into `tokens_per_tile` feature rows; in prompt order, those
rows replace the embeddings of the `<|patch|>` tokens, one row per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.args import VisionArgs
from common.chat_format import encode_image, image_specials
from common.generation import encode_prompt
from common.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptImages:
    """Tiles of every image in a prompt and the positions their feature rows go to."""

    pixels: np.ndarray  # [T, 3, S, S] float32: every tile of every image, in prompt order
    positions: np.ndarray  # [T * tokens_per_tile] int64: prompt index of each <|patch|> token

    @property
    def n_rows(self) -> int:
        return len(self.positions)

    def rows(self, start: int, length: int) -> np.ndarray:
        """Feature row of prompt positions start .. start+length-1, int64 [length]; `n_rows` where the
        token is not a patch (the caller keeps a zero row there)."""
        out = np.full(length, self.n_rows, dtype=np.int64)
        inside = (self.positions >= start) & (self.positions < start + length)
        out[self.positions[inside] - start] = np.nonzero(inside)[0]
        return out


def _check_tiles(tiles: Sequence[np.ndarray], size: int) -> None:
    for i, t in enumerate(tiles, start=1):
        if not isinstance(t, np.ndarray) or t.ndim != 4 or t.shape[1:] != (3, size, size):
            shape = list(t.shape) if isinstance(t, np.ndarray) else type(t).__name__
            raise ValueError(f"image {i}: expected tiles [N, 3, {size}, {size}], got {shape}")


def prompt_images(ids: Sequence[int], tiles: Sequence[np.ndarray], specials: dict[str, int],
                  vision: VisionArgs) -> PromptImages:
    """Check that each image's <|image_start|> .. <|image_end|> span of `ids` holds exactly one run of
    `<|patch|>` tokens per tile, and that no patch token lies outside an image."""
    _check_tiles(tiles, vision.image_size)
    t = image_specials(specials)
    arr = np.asarray(ids, dtype=np.int64)
    starts = np.nonzero(arr == t["<|image_start|>"])[0]
    ends = np.nonzero(arr == t["<|image_end|>"])[0]
    if len(starts) != len(tiles) or len(ends) != len(tiles):
        raise ValueError(f"the prompt holds {len(starts)} image(s) (<|image_start|> tokens) and {len(ends)} "
                         f"<|image_end|> tokens, but {len(tiles)} image(s) were given")
    patches = np.nonzero(arr == t["<|patch|>"])[0]
    bounds = np.concatenate([[-1], ends])
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if not bounds[i] < start < end:
            raise ValueError(f"image {i + 1}: <|image_start|> at {start} and <|image_end|> at {end} are out of order")
        found = int(np.count_nonzero((patches > start) & (patches < end)))
        want = len(tiles[i]) * vision.tokens_per_tile
        if found != want:
            raise ValueError(f"image {i + 1}: the prompt has {found} <|patch|> tokens, but its {len(tiles[i])} "
                             f"tile(s) give {want} ({vision.tokens_per_tile} per tile)")
    if len(patches) != sum(len(x) for x in tiles) * vision.tokens_per_tile:
        raise ValueError("the prompt has <|patch|> tokens outside <|image_start|> .. <|image_end|>")
    size = vision.image_size
    pixels = np.concatenate([np.zeros((0, 3, size, size), np.float32), *(x.astype(np.float32) for x in tiles)])
    return PromptImages(pixels=pixels, positions=patches)


def prepare_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], images: Sequence[Any] | None,
                   vision: VisionArgs | None, max_tiles: int = 16,
                   no_vision: str = "this model's config has no vision part") -> tuple[list[int], PromptImages | None]:
    """Prompt ids and their images. A text prompt with images becomes bos, the images, then the text
    (the reference's completion layout); a prompt of ids must already hold the images' tokens.

    `images`: PIL images or image files; with a prompt of ids, also preprocessed tiles [N, 3, S, S].
    `no_vision` says why a model without `vision` takes none (`common.vision_checkpoint.no_vision`).
    """
    if not images:
        return encode_prompt(tokenizer, prompt), None
    if vision is None:
        raise ValueError(f"images need a model with a vision encoder; {no_vision}")
    specials = tokenizer.special_tokens
    if isinstance(prompt, str):
        if any(isinstance(x, np.ndarray) for x in images):
            raise ValueError("a text prompt needs images as files or PIL images (their tile grid sets the tokens)")
        ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        tiles = []
        for image in images:
            tokens, t = encode_image(image, vision, specials, max_tiles)
            ids += tokens
            tiles.append(t)
        ids += tokenizer.encode(prompt, bos=False, eos=False)
    else:
        ids = [int(i) for i in prompt]
        tiles = [x if isinstance(x, np.ndarray) else encode_image(x, vision, specials, max_tiles)[1] for x in images]
    return ids, prompt_images(ids, tiles, specials, vision)
