"""Backend-neutral records passed between the model, the generator and the apps.

Arrays are the backend's own type (mlx.core.array or torch.Tensor); these records never convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MaskedEmbedding:
    """Image features to merge into the token stream.

    embedding: [B, L, vision_output_dim]; mask: [B, L, 1] bool, True at `<|patch|>` positions.
    """

    embedding: Any
    mask: Any


@dataclass(frozen=True)
class TransformerInput:
    """tokens: int array [B, L]; tokens_position: absolute position of tokens[:, 0], an int for every
    row or one start per row ([B] ints); lengths: None (every row fills L) or [B] real lengths, the
    rest of a row being right padding that never reaches a cache nor changes another row."""

    tokens: Any
    tokens_position: Any = 0
    image_embedding: MaskedEmbedding | None = None
    lengths: Any = None


@dataclass(frozen=True)
class TransformerOutput:
    """logits: float32 [B, L, V]."""

    logits: Any


@dataclass(frozen=True)
class GenerationResponse:
    """One step of `stream_generate`: the new text segment and running statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop", "length" or None while generating
