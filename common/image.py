"""Image preprocessing for the Llama 4 vision encoder (Pillow + numpy), as Meta's reference does it.

An image is composited to RGB, fitted without distortion into the best canvas of at most
`max_tiles` square tiles, pasted top-left on black, scaled to [-1, 1] and cut into tiles in
row-major order; with more than one tile, a global view of the whole image (resized to one tile,
distorting) follows last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

TILE_SIZE = 336
MAX_TILES = 16

ImageLike = Image.Image | str | Path


MAX_PIXELS = 64 << 20  # 67M pixels: far beyond what the tiles use, far below what exhausts memory


class ImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclass(frozen=True)
class TilePlan:
    """Where an image of a given size goes: sizes are (width, height), grid is (rows, cols)."""

    canvas: tuple[int, int]
    resized: tuple[int, int]
    grid: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        """Tiles fed to the encoder, the global view included when there is more than one tile."""
        rows, cols = self.grid
        return rows * cols + (1 if rows * cols > 1 else 0)


def supported_canvases(max_tiles: int = MAX_TILES, tile_size: int = TILE_SIZE) -> list[tuple[int, int]]:
    """Every (width, height) grid of at most `max_tiles` tiles, in the reference's order.

    For n = max_tiles down to 1, the factor pairs (a, n/a) with a ascending, grouped by aspect
    ratio in first-seen order; the order decides ties in `plan_tiles`.
    """
    groups: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for a in sorted({d for d in range(1, n + 1) if n % d == 0}):
            groups.setdefault(a / (n // a), []).append((a * tile_size, n // a * tile_size))
    return [canvas for group in groups.values() for canvas in group]


def _best_canvas(size: tuple[int, int], canvases: list[tuple[int, int]]) -> tuple[int, int]:
    """The smallest upscale among canvases that fit (else the mildest downscale), then least area."""
    w, h = size
    dims = np.array(canvases, dtype=np.int64)  # [C, 2] (width, height)
    # Scales in float32, as the reference computes them with torch, so ties break the same way.
    scales = np.minimum(dims[:, 0].astype(np.float32) / np.float32(w), dims[:, 1].astype(np.float32) / np.float32(h))
    up = scales[scales >= 1]
    chosen = up.min() if up.size else scales[scales < 1].max()
    candidates = dims[scales == chosen]
    cw, ch = candidates[int(np.argmin(candidates[:, 0] * candidates[:, 1]))]
    return int(cw), int(ch)


def _fit(size: tuple[int, int], canvas: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """Resized (width, height): no distortion, within the canvas, upscaled at most to one tile side."""
    w, h = size
    tw, th = min(max(w, tile_size), canvas[0]), min(max(h, tile_size), canvas[1])
    if tw / w < th / h:
        return tw, min(math.floor(h * (tw / w)), th)
    return min(math.floor(w * (th / h)), tw), th


def plan_tiles(size: tuple[int, int], tile_size: int = TILE_SIZE, max_tiles: int = MAX_TILES) -> TilePlan:
    """Canvas, resized size and tile grid for an image of `size` = (width, height)."""
    if min(size) < 1:
        raise ImageError(f"image size must be at least 1x1, got {size[0]}x{size[1]}")
    canvas = _best_canvas(size, supported_canvases(max_tiles, tile_size))
    w, h = _fit(size, canvas, tile_size)
    return TilePlan(canvas=canvas, resized=(max(w, 1), max(h, 1)),
                    grid=(canvas[1] // tile_size, canvas[0] // tile_size))


def load_image(image: ImageLike) -> Image.Image:
    """An RGB image from a path or PIL image: RGBA is composited on white, other modes converted."""
    name = "image" if isinstance(image, Image.Image) else str(image)
    try:
        if not isinstance(image, Image.Image):
            with Image.open(Path(image).expanduser()) as f:
                w, h = f.size
                if w * h > MAX_PIXELS:  # before decoding: a small file can claim a huge image
                    raise ImageError(f"{name}: {w}x{h} pixels, more than the {MAX_PIXELS} this program decodes")
                f.load()  # decode now, so a truncated file fails here
                image = f.copy()
        if image.mode == "RGBA":
            rgb = Image.new("RGB", image.size, (255, 255, 255))
            rgb.paste(image, mask=image.getchannel("A"))
            return rgb
        return image.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{name}: image file not found") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file in a format Pillow can read") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({reason})") from e


def _to_array(image: Image.Image) -> np.ndarray:
    """[3, H, W] float32 in [-1, 1]: x / 255, then (x - 0.5) / 0.5, in float32 like the reference."""
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)  # [H, W, 3]
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]


def preprocess_image(image: ImageLike, tile_size: int = TILE_SIZE,
                     max_tiles: int = MAX_TILES) -> tuple[np.ndarray, tuple[int, int]]:
    """Tiles float32 [N, 3, tile_size, tile_size] (row-major, global view last when N > 1) and the
    tile grid (rows, cols), for a PIL image or an image file."""
    rgb = load_image(image)
    plan = plan_tiles(rgb.size, tile_size, max_tiles)
    canvas = Image.new("RGB", plan.canvas, (0, 0, 0))
    canvas.paste(rgb.resize(plan.resized, Image.Resampling.BILINEAR), (0, 0))
    rows, cols = plan.grid
    x = _to_array(canvas).reshape(3, rows, tile_size, cols, tile_size)  # [3, rows*S, cols*S] -> tiles
    tiles = x.transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size, tile_size)  # -> [rows*cols, 3, S, S]
    if rows * cols > 1:
        whole = _to_array(rgb.resize((tile_size, tile_size), Image.Resampling.BILINEAR))  # [3, S, S]
        tiles = np.concatenate([tiles, whole[None]], axis=0)
    return np.ascontiguousarray(tiles), plan.grid
