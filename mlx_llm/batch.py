"""Batched generation in MLX: `BatchGenerator` (continuous batching) and `batch_generate`.

The scheduling, stop rules and prompt cache are `common`'s; this module is the array work.
Shapes: B rows, W padded prefill width, V vocabulary, O vision output dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from common import batch_generator
from common.batch_run import run_batch
from common.datatypes import BatchResult, MaskedEmbedding, TransformerInput
from common.image_prompt import PromptImages
from common.penalties import PenaltyBatch
from common.prompt_cache import PromptCache
from common.sampling import SamplingBatch, SamplingParams
from common.tokenizer import Tokenizer
from mlx_llm.cache import merge_caches
from mlx_llm.generate import _image_table
from mlx_llm.model import Transformer
from mlx_llm.sample import sample_rows, token_logprobs


def _arrays(caches: list) -> list[mx.array]:
    return [a for c in caches for a in (c.keys, c.values) if a is not None]


class MlxBatchOps:
    def __init__(self, model: Transformer) -> None:
        self.model = model

    def make_cache(self) -> list:
        return self.model.make_cache(1)

    def merge(self, parts: Sequence[list]) -> list:
        return merge_caches(parts)

    def select(self, caches: list, rows: Sequence[int]) -> list:
        return [c.select(rows) for c in caches]

    def join(self, running: list | None, rows: Sequence[list]) -> list:
        return merge_caches(([running] if running is not None else []) + list(rows))

    def filter(self, caches: list, rows: Sequence[int]) -> list | None:
        return self.select(caches, rows) if rows else None

    def image_table(self, images: PromptImages, prompt_len: int) -> mx.array:
        return _image_table(self.model, images, prompt_len)

    def prefill(self, caches: list, chunks: list[list[int]], starts: np.ndarray,
                images: list[tuple[Any, PromptImages, int] | None]) -> mx.array:
        """Each row's chunk (right-padded) after its cached positions; logits [B, V] of each row's last token."""
        lengths = np.array([len(c) for c in chunks])
        tokens = np.zeros((len(chunks), int(lengths.max())), dtype=np.int32)  # [B, W]
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = c
        inp = TransformerInput(tokens=mx.array(tokens), tokens_position=starts, lengths=lengths,
                               image_embedding=self._images(images, tokens.shape[1]))
        logits = self.model(inp, cache=caches, last_only=True).logits[:, 0]  # [B, V]
        mx.eval(logits, _arrays(caches))  # bound the lazy graph at every prefill step
        return logits

    def _images(self, images: list[tuple[Any, PromptImages, int] | None], width: int) -> MaskedEmbedding | None:
        """Image feature rows of every row's chunk positions [B, W, O] and where they go [B, W, 1]."""
        if all(x is None for x in images):
            return None
        out_dim = next(x for x in images if x is not None)[0].shape[1]
        embs, masks = [], []
        for x in images:
            if x is None:
                embs.append(mx.zeros((width, out_dim)))
                masks.append(np.zeros(width, dtype=bool))
            else:
                table, pics, start = x
                rows = pics.rows(start, width)  # [W]; n_rows (a zero row) where not a patch
                embs.append(table[mx.array(rows)].astype(mx.float32))
                masks.append(rows < pics.n_rows)
        return MaskedEmbedding(embedding=mx.stack(embs), mask=mx.array(np.stack(masks))[..., None])  # [B, W, *]

    def decode(self, caches: list, tokens: mx.array, positions: np.ndarray) -> mx.array:
        inp = TransformerInput(tokens=tokens[:, None], tokens_position=positions)  # tokens [B] -> [B, 1]
        return self.model(inp, cache=caches).logits[:, 0]  # [B, V], lazy

    def sample(self, logits: mx.array, rows: SamplingBatch, uniforms: np.ndarray,
               penalties: PenaltyBatch | None = None) -> mx.array:
        return sample_rows(logits, rows, uniforms, penalties)

    def take(self, x: mx.array, rows: Sequence[int]) -> mx.array:
        return x[mx.array(list(rows))]

    def concat(self, parts: Sequence[mx.array]) -> mx.array:
        return mx.concatenate(list(parts))

    def to_list(self, tokens: mx.array) -> list[int]:
        return tokens.tolist()

    def logprobs(self, logits: mx.array, tokens: mx.array, n: int) -> tuple[np.ndarray, ...]:
        return token_logprobs(logits, tokens, n)


class BatchGenerator(batch_generator.BatchGenerator):
    """Continuous batching over one model (see `common.batch_generator`)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16, prefill_step_size: int = 512,
                 prompt_cache: PromptCache | None = None) -> None:
        super().__init__(model, tokenizer, max_batch, prefill_step_size, prompt_cache, ops=MlxBatchOps(model))


def batch_generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int = 256, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                   images: Sequence[Sequence[Any] | None] | None = None, max_batch: int = 32,
                   prefill_step_size: int = 512) -> list[BatchResult]:
    """Generate for every prompt (text or ids, any lengths) in one continuous batch; one result per prompt.
    `sampling`: one SamplingParams for all or one per prompt; `images`: None or one list (or None) per prompt."""
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size)
    return run_batch(gen, prompts, max_tokens, sampling, images)
