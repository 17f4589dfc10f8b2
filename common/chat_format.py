"""Llama 4 chat format: messages -> prompt token ids, exactly as Meta's reference lays them out.

    <|begin_of_text|>
    per message: <|header_start|> role <|header_end|> "\\n\\n" content <|eot|> (or <|eom|>)
    finally:     <|header_start|> assistant <|header_end|> "\\n\\n"   (open for the model to complete)

Role "tool" is written as "ipython". A message ends with <|eom|> when it is a tool result, or an
assistant message with stop_reason "end_of_message"; otherwise with <|eot|>.

A user message's content may also be a list of text and image items; each image becomes the
token layout of `image_tokens` (one run of `<|patch|>` per tile), and its tiles are returned beside
the ids by `encode_dialog`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.args import VisionArgs
from common.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
STOP_REASONS = ("end_of_turn", "end_of_message")
REQUIRED_SPECIALS = ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>")
_KEYS = {"role", "content", "stop_reason", "context"}
IMAGE_SPECIALS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                  "<|tile_y_separator|>")

Message = Mapping[str, Any]
Item = tuple[str, Any]  # ("text", str) or ("image", PIL image or path)


def image_specials(specials: Mapping[str, int]) -> dict[str, int]:
    """The ids of the Llama 4 image tokens, or ValueError naming those the tokenizer lacks."""
    missing = [t for t in IMAGE_SPECIALS if t not in specials]
    if missing:
        raise ValueError(f"tokenizer lacks the Llama 4 image tokens {missing}; images need a Llama 4 tokenizer")
    return {t: specials[t] for t in IMAGE_SPECIALS}


def image_tokens(grid: tuple[int, int], tokens_per_tile: int, specials: Mapping[str, int]) -> list[int]:
    """Prompt tokens of one image cut into `grid` = (rows, cols) tiles (reference §5.2).

    One tile: <|image_start|> <|image|> patches <|image_end|>. Several: the tiles row by row, each
    row's tiles split by <|tile_x_separator|> and every row closed by <|tile_y_separator|>, then
    <|image|> and the global view's patches, then <|image_end|>.
    """
    t = image_specials(specials)
    patches = [t["<|patch|>"]] * tokens_per_tile
    rows, cols = grid
    if rows * cols == 1:
        return [t["<|image_start|>"], t["<|image|>"], *patches, t["<|image_end|>"]]
    ids = [t["<|image_start|>"]]
    for _ in range(rows):
        for c in range(cols):
            ids += patches + ([t["<|tile_x_separator|>"]] if c < cols - 1 else [])
        ids.append(t["<|tile_y_separator|>"])
    return ids + [t["<|image|>"], *patches, t["<|image_end|>"]]


def encode_image(image: Any, vision: VisionArgs | None, specials: Mapping[str, int],
                 max_tiles: int = 16) -> tuple[list[int], np.ndarray]:
    """(prompt tokens, tiles [N, 3, S, S]) of a PIL image or image file for a model's vision part."""
    from common.image import preprocess_image

    if vision is None:
        raise ValueError("images need a model with a vision encoder; this model's config has no vision part")
    tiles, grid = preprocess_image(image, vision.image_size, max_tiles)
    return image_tokens(grid, vision.tokens_per_tile, specials), tiles


class ChatFormat:
    """Encodes dialogs for any tokenizer that defines the Llama 4 header and end-of-turn tokens."""

    def __init__(self, tokenizer: Tokenizer, vision_args: VisionArgs | None = None, max_tiles: int = 16) -> None:
        specials = tokenizer.special_tokens
        missing = [t for t in REQUIRED_SPECIALS if t not in specials]
        if missing:
            raise ValueError(
                f"tokenizer lacks the Llama 4 chat special tokens {missing}; "
                "use plain completion (encode_completion) with this tokenizer"
            )
        self.tokenizer = tokenizer
        self.vision_args, self.max_tiles = vision_args, max_tiles
        self._header_start = specials["<|header_start|>"]
        self._header_end = specials["<|header_end|>"]
        self._eot = specials["<|eot|>"]
        self._eom = specials["<|eom|>"]
        # The reference starts every prompt with <|begin_of_text|>; other tokenizers use their bos.
        self._bos = specials.get("<|begin_of_text|>", tokenizer.bos_id)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _begin(self) -> list[int]:
        return [self._bos] if self._bos is not None else []

    def encode_header(self, role: str) -> list[int]:
        """<|header_start|> role <|header_end|> "\\n\\n" (role "tool" is written "ipython")."""
        name = "ipython" if role == "tool" else role
        return [self._header_start, *self._text(name), self._header_end, *self._text("\n\n")]

    def _content(self, items: list[Item]) -> tuple[list[int], list[np.ndarray]]:
        tokens: list[int] = []
        images = []
        for kind, value in items:
            if kind == "text":
                tokens += self._text(value)
                continue
            ids, tiles = encode_image(value, self.vision_args, self.tokenizer.special_tokens, self.max_tiles)
            tokens += ids
            images.append(tiles)
        return tokens, images

    def _message(self, message: Message) -> tuple[list[int], list[np.ndarray]]:
        role, items, stop_reason, context = _validate(message)
        tokens, images = self._content(items)
        tokens = self.encode_header(role) + tokens
        if role == "user" and context is not None:
            tokens += self._text("\n\n") + self._text(context)
        eom = role == "tool" or (role == "assistant" and stop_reason == "end_of_message")
        tokens.append(self._eom if eom else self._eot)
        return tokens, images

    def encode_message(self, message: Message) -> list[int]:
        """Header, content (plus "\\n\\n" + context for a user message with `context`), end token."""
        return self._message(message)[0]

    def encode_dialog(self, messages: Sequence[Message]) -> tuple[list[int], list[np.ndarray]]:
        """Prompt ids as `encode_dialog_prompt`, and each image's tiles [N, 3, S, S] in prompt order."""
        tokens, images = self._begin(), []
        for message in messages:
            ids, tiles = self._message(message)
            tokens += ids
            images += tiles
        return tokens + self.encode_header("assistant"), images

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """bos, every message, then the open assistant header for the model to continue."""
        return self.encode_dialog(messages)[0]

    def encode_completion(self, text: str) -> list[int]:
        """A plain (non-chat) prompt: bos followed by the text."""
        return self._begin() + self._text(text)


def _items(role: str, content: Any) -> list[Item]:
    """A message's content as ("text", str) and ("image", image) items; images only from the user."""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"chat message 'content' must be a str or a list of items, got {type(content).__name__}")
    items: list[Item] = []
    for item in content:
        if isinstance(item, str):
            items.append(("text", item))
        elif isinstance(item, Mapping) and item.get("type") == "text" and isinstance(item.get("text"), str):
            items.append(("text", item["text"]))
        elif isinstance(item, Mapping) and item.get("type") == "image" and item.get("image") is not None:
            if role != "user":
                raise ValueError(f"chat message: images belong in user messages, found one in a {role!r} message")
            items.append(("image", item["image"]))
        else:
            raise ValueError("chat message content items must be str, {'type': 'text', 'text': str} or "
                             f"{{'type': 'image', 'image': PIL image or path}}, got {item!r:.80}")
    return items


def _validate(message: Message) -> tuple[str, list[Item], str | None, str | None]:
    """(role, content items, stop_reason, context) of a message dict, or ValueError naming the field."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a chat message must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - _KEYS)
    if unknown:
        raise ValueError(f"chat message has unsupported keys {unknown}; expected some of {sorted(_KEYS)}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"chat message 'role' must be one of {ROLES}, got {role!r}")
    items = _items(role, content)
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"chat message 'stop_reason' must be one of {STOP_REASONS}, got {stop_reason!r}")
    context = message.get("context")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"chat message 'context' must be a str, got {type(context).__name__}")
    return role, items, stop_reason, context
