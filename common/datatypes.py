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


@dataclass(frozen=True)
class BatchEvent:
    """One row's news from `BatchGenerator.step`: a token and the text it completed, and the row's end.

    finish_reason: "stop" (a stop token or stop string; neither is in `text`), "length" (max_tokens or
    the context's end), "error" (`error` says why; the other rows go on), or None while generating.
    logprob: the model's log-probability of `token`; top_logprobs: the most likely (id, logprob) pairs.
    """

    uid: int
    token: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class BatchResult:
    """One prompt's outcome from `batch_generate`."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int = 0
