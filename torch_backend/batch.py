"""Batched generation in PyTorch: `BatchGenerator` (continuous batching) and `batch_generate`.

The scheduling, stop rules and prompt cache are `common`'s; this module is the array work.
Shapes: B rows, W padded prefill width, V vocabulary, O vision output dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from common import batch_generator
from common.batch_run import run_batch
from common.datatypes import BatchResult, MaskedEmbedding, TransformerInput
from common.image_prompt import PromptImages
from common.penalties import PenaltyBatch
from common.prompt_cache import PromptCache
from common.sampling import SamplingBatch, SamplingParams
from common.tokenizer import Tokenizer
from torch_backend.cache import merge_caches
from torch_backend.generate import _image_table
from torch_backend.graphs import DecodeRunner, RowPool, bucket
from torch_backend.model import Transformer
from torch_backend.sample import sample_rows, token_logprobs


class TorchBatchOps:
    """With `pooled` (on CUDA with graphs on), the running rows live in a `RowPool` and decode through
    `DecodeRunner`'s graphs; otherwise in plain batch caches, decoded by the model's forward."""

    def __init__(self, model: Transformer, max_batch: int, pooled: bool | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.pooled = model.cuda_graphs and self.device.type == "cuda" if pooled is None else pooled
        self.max_batch = max_batch
        self.runner = DecodeRunner(model, graphs=model.cuda_graphs) if self.pooled else None

    def make_cache(self) -> list:
        return self.model.make_cache(1)

    def merge(self, parts: Sequence[list]) -> list:
        return merge_caches(parts)

    def join(self, running: Any, rows: Sequence[list]) -> Any:
        """The running batch with `rows` (single-row caches) after its rows."""
        if not self.pooled:
            return merge_caches(([running] if running is not None else []) + list(rows))
        pool = running if running is not None else RowPool(self.model, bucket(self.max_batch))
        pool.admit(rows)
        return pool

    def select(self, caches: Any, rows: Sequence[int]) -> list:
        return caches.select(rows) if isinstance(caches, RowPool) else [c.select(rows) for c in caches]

    def filter(self, caches: Any, rows: Sequence[int]) -> Any:
        if isinstance(caches, RowPool):
            caches.keep(list(rows))  # kept when empty: its storage and graphs serve the next rows
            return caches
        return self.select(caches, rows) if rows else None

    def image_table(self, images: PromptImages, prompt_len: int) -> torch.Tensor:
        with torch.inference_mode():
            return _image_table(self.model, images, prompt_len)

    def prefill(self, caches: list, chunks: list[list[int]], starts: np.ndarray,
                images: list[tuple[Any, PromptImages, int] | None]) -> torch.Tensor:
        """Each row's chunk (right-padded) after its cached positions; logits [B, V] of each row's last token."""
        lengths = np.array([len(c) for c in chunks])
        tokens = torch.zeros((len(chunks), int(lengths.max())), dtype=torch.long)  # [B, W]
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.tensor(c)
        inp = TransformerInput(tokens=tokens.to(self.device), tokens_position=starts, lengths=lengths,
                               image_embedding=self._images(images, tokens.shape[1]))
        with torch.inference_mode():
            return self.model(inp, cache=caches, last_only=True).logits[:, 0]  # [B, V]

    def _images(self, images: list[tuple[Any, PromptImages, int] | None], width: int) -> MaskedEmbedding | None:
        """Image feature rows of every row's chunk positions [B, W, O] and where they go [B, W, 1]."""
        if all(x is None for x in images):
            return None
        out_dim = next(x for x in images if x is not None)[0].shape[1]
        emb = torch.zeros((len(images), width, out_dim), device=self.device)  # [B, W, O]
        mask = torch.zeros((len(images), width, 1), dtype=torch.bool, device=self.device)  # [B, W, 1]
        for b, x in enumerate(images):
            if x is not None:
                table, pics, start = x
                rows = pics.rows(start, width)  # [W]; n_rows (a zero row) where not a patch
                emb[b] = table[torch.from_numpy(rows).to(table.device)].to(emb.dtype)
                mask[b, :, 0] = torch.from_numpy(rows < pics.n_rows)
        return MaskedEmbedding(embedding=emb, mask=mask)

    def decode(self, caches: Any, tokens: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            if isinstance(caches, RowPool):
                logits = self.runner(caches.caches, caches.n, tokens, positions)  # [B, V]
                caches.advance(positions)
                return logits
            inp = TransformerInput(tokens=tokens[:, None], tokens_position=positions)  # tokens [B] -> [B, 1]
            return self.model(inp, cache=caches).logits[:, 0]  # [B, V]

    def sample(self, logits: torch.Tensor, rows: SamplingBatch, uniforms: np.ndarray,
               penalties: PenaltyBatch | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return sample_rows(logits, rows, uniforms, penalties)

    def take(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        return x[torch.tensor(list(rows), device=x.device)]

    def concat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts))

    def to_list(self, tokens: torch.Tensor) -> list[int]:
        return tokens.tolist()

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[np.ndarray, ...]:
        with torch.inference_mode():
            return token_logprobs(logits, tokens, n)


class BatchGenerator(batch_generator.BatchGenerator):
    """Continuous batching over one model (see `common.batch_generator`)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16, prefill_step_size: int = 512,
                 prompt_cache: PromptCache | None = None) -> None:
        super().__init__(model, tokenizer, max_batch, prefill_step_size, prompt_cache,
                         ops=TorchBatchOps(model, max_batch))


def batch_generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int = 256, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                   images: Sequence[Sequence[Any] | None] | None = None, max_batch: int = 32,
                   prefill_step_size: int = 512) -> list[BatchResult]:
    """Generate for every prompt (text or ids, any lengths) in one continuous batch; one result per prompt.
    `sampling`: one SamplingParams for all or one per prompt; `images`: None or one list (or None) per prompt."""
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size)
    return run_batch(gen, prompts, max_tokens, sampling, images)
