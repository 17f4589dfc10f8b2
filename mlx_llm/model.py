"""Llama 4 text transformer in MLX: pre-norm blocks of attention and dense or MoE feed-forward.

Shapes: B batch, L tokens in this call, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.args import LayerRole, ModelArgs
from common.datatypes import MaskedEmbedding, TransformerInput, TransformerOutput
from common.spans import check_input
from mlx_llm.attention import Attention, Positions, rms_norm
from mlx_llm.cache import ChunkedKVCache, KVCache
from mlx_llm.moe import FeedForward, MoE
from mlx_llm.parallel import linear
from mlx_llm.vision import VisionEmbeddings

Cache = KVCache | ChunkedKVCache


class RMSNorm(nn.Module):
    """Norm in float32, cast back, then the weight multiply in the model dtype (reference order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return mx.fast.rms_norm(x, self.weight, self.eps)  # the same order, in one kernel
        return rms_norm(x, self.eps) * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, role: LayerRole) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, role)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args) if role.moe else FeedForward(args.dim, args.ffn_hidden_dim)

    def fuse(self) -> None:
        self.attention.fuse()
        self.feed_forward.fuse()

    def __call__(self, x: mx.array, pos: Positions, cache: Cache | None = None, last_only: bool = False) -> mx.array:
        """[B, L, D] -> [B, L, D], or [B, 1, D] for each row's last position alone (the cache gets all)."""
        h = (pos.last(x) if last_only else x) + self.reduce(self.attention(self.attention_norm(x), pos, cache,
                                                                           last_only))
        return h + self.reduce(self.feed_forward(self.ffn_norm(h)))

    @staticmethod
    def reduce(x: mx.array) -> mx.array:
        """Identity in one process; under tensor parallelism the sum of the ranks' partial outputs."""
        return x


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args, role) for role in args.layer_roles]
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.world: Any = None  # a tensor-parallel world (`attach_world`), or None
        if args.vision_args is not None:
            self.vision_embeddings = VisionEmbeddings(args.vision_args)
            self.vision_projection = nn.Linear(args.vision_args.output_dim, args.dim, bias=False)

    def fuse(self) -> None:
        """Store q|k|v and gate|value projections as single matrices (the canonical parameters
        become views of them): fewer, larger products. `load_model` calls it; anything that later
        replaces the parameters (load_weights, set_dtype) silently returns to separate products."""
        for layer in self.layers:
            layer.fuse()

    def make_cache(self, batch_size: int = 1) -> list[Cache]:
        """One cache per layer: a chunk ring for chunked RoPE layers, a growing cache otherwise."""
        chunk = self.args.attention_chunk_size
        return [ChunkedKVCache(chunk, batch_size) if role.chunked else KVCache(batch_size)
                for role in self.args.layer_roles]

    def _merge_image(self, h: mx.array, image: MaskedEmbedding) -> mx.array:
        """Token embeddings with the projected image features at the masked (`<|patch|>`) rows."""
        if self.args.vision_args is None:
            raise ValueError("TransformerInput.image_embedding given, but this model has no vision encoder")
        B, L, _ = h.shape
        out_dim = self.args.vision_args.output_dim
        if tuple(image.embedding.shape) != (B, L, out_dim) or tuple(image.mask.shape) != (B, L, 1):
            raise ValueError(f"image_embedding: expected embedding [{B}, {L}, {out_dim}] and mask [{B}, {L}, 1], "
                             f"got {list(image.embedding.shape)} and {list(image.mask.shape)}")
        projected = self.vision_projection(image.embedding.astype(h.dtype))  # [B, L, D]
        return mx.where(image.mask.astype(mx.bool_), projected, h)

    def __call__(self, inputs: TransformerInput, cache: list[Cache] | None = None,
                 last_only: bool = False) -> TransformerOutput:
        """Logits [B, L, V] float32; `last_only` computes the last position's alone ([B, 1, V]),
        all a prefill needs."""
        tokens = inputs.tokens
        pos = Positions(self.args, check_input(inputs, cache, len(self.layers), self.args.max_seq_len))
        h = self.embed(tokens)  # [B, L, D]
        if inputs.image_embedding is not None:
            h = self._merge_image(h, inputs.image_embedding)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # With last_only, the final layer runs its attention output and feed-forward for one position.
            h = layer(h, pos, None if cache is None else cache[i], last_only and i == last)
        return TransformerOutput(logits=self.project(self.norm(h)))  # [B, L, V]

    def embed(self, tokens: mx.array) -> mx.array:
        """Token embeddings [B, L, D]; a rank of a tensor-parallel world holds the rows of its vocabulary
        range, so it looks up its own ids, zeroes the others, and the ranks' rows are summed."""
        if self.world is None:
            return self.tok_embeddings(tokens)
        V = self.args.vocab_size  # this rank's share
        local = tokens - self.world.rank * V
        inside = (local >= 0) & (local < V)
        h = self.tok_embeddings(mx.clip(local, 0, V - 1))
        return self.world.all_sum(h * inside[..., None].astype(h.dtype))

    def project(self, h: mx.array) -> mx.array:
        """Float32 logits [..., V] of normed hidden states; tensor-parallel ranks gather their vocabulary ranges."""
        logits = linear(self.output, h).astype(mx.float32)
        return logits if self.world is None else self.world.all_gather_last(logits)

    def attach_world(self, world: Any) -> None:
        """Run as one rank of a tensor-parallel world (`mlx_llm.distributed.World`); the model must hold
        that rank's share (`common.tensor_parallel.Layout.local_args`)."""
        self.world = world
        for layer in self.layers:
            layer.reduce = world.all_sum
