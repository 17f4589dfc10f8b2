"""The Llama 4 text transformer in PyTorch: pre-norm blocks of attention and dense or MoE SwiGLU.

Shapes: B batch, L query length, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.args import LayerRole, ModelArgs
from common.datatypes import MaskedEmbedding, TransformerInput, TransformerOutput
from common.spans import check_input
from torch_backend.attention import Attention, Positions, RotaryTable, rms_norm, temperature_table
from torch_backend.cache import ChunkedKVCache, KVCache
from torch_backend.fused import FusedGroup, FusedModule, linear, refresh_fused
from torch_backend.moe import FeedForward, MoE
from torch_backend.vision import VisionEmbeddings

Cache = KVCache | ChunkedKVCache


class RMSNorm(nn.Module):
    """RMS norm in float32, cast back to x's dtype, then scaled by the weight in the model dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same order, in one call
        return rms_norm(x, self.eps) * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, role: LayerRole) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, role)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args) if role.moe else FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, pos: Positions, cache: Cache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D], or [B, 1, D] for the last position alone (the cache gets all)."""
        h = (pos.last(x) if last_only else x) + self.reduce(self.attention(self.attention_norm(x), pos, cache,
                                                                           last_only))
        return h + self.reduce(self.feed_forward(self.ffn_norm(h)))

    @staticmethod
    def reduce(x: torch.Tensor) -> torch.Tensor:
        """Identity in one process; under tensor parallelism the sum of the ranks' partial outputs."""
        return x


class Transformer(FusedModule):
    """The text model (and the vision encoder when `args` has one).

    Projections are stored fused (`torch_backend.fused`); a load hook rebuilds
    that storage after `load_state_dict(..., assign=True)` replaced the parameters.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, role) for role in args.layer_roles)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope = RotaryTable(args)
        self.temperatures = temperature_table(args)
        self.cuda_graphs = True  # decode through CUDA graphs where the model is on CUDA (`load(cuda_graphs=...)`)
        self.compile_decode = False  # decode through torch.compile on the CPU (`load(compile_decode=...)`)
        self._compiled_runner: Any = None  # that runner, made on first use
        self.world: Any = None  # a tensor-parallel world (`attach_world`), or None
        self._output = FusedGroup([(self.output, "weight")])
        self.register_load_state_dict_post_hook(lambda model, _: refresh_fused(model))
        if args.vision_args is not None:
            self.vision_embeddings = VisionEmbeddings(args.vision_args)
            self.vision_projection = nn.Linear(args.vision_args.output_dim, args.dim, bias=False)

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return (self._output,)

    def make_cache(self, batch_size: int = 1) -> list[Cache]:
        """One cache per layer: a chunk ring for chunked RoPE layers, a growing cache otherwise."""
        chunk = self.args.attention_chunk_size
        return [ChunkedKVCache(chunk, batch_size) if role.chunked else KVCache(batch_size)
                for role in self.args.layer_roles]

    def forward(self, inputs: TransformerInput, cache: list[Cache] | None = None,
                last_only: bool = False) -> TransformerOutput:
        """Logits [B, L, V] float32; `last_only` computes the last position's alone ([B, 1, V]),
        all a prefill needs."""
        tokens = inputs.tokens
        spans = check_input(inputs, cache, len(self.layers), self.args.max_seq_len)
        h = self.embed(tokens.to(self.tok_embeddings.weight.device))  # [B, L, D]
        if inputs.image_embedding is not None:
            h = self._merge_image(h, inputs.image_embedding)
        pos = Positions(self.args, self.rope, self.temperatures, spans, h.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            # With last_only, the final layer runs its attention output and feed-forward for one position.
            h = layer(h, pos, None if cache is None else cache[i], last_only and i == last)
        return TransformerOutput(logits=self.project(self.norm(h)))  # [B, L, V]

    def prepare_decode(self, cache: list[Cache], end: int, ahead: int = 0) -> bool:
        """Room for `decode_rows` up to position end-1, made outside the step: the RoPE and temperature
        tables and every cache's slots; what has to grow grows for `ahead` more positions. Whether any
        of them moved (a graph captured over them is then stale)."""
        device, dtype = self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype
        tables = [t for t in (self.rope, self.temperatures) if t is not None]
        short = [t for t in tables if t.rows is None or t.rows.device != device or t.rows.shape[0] < end]
        full = [c for c in cache if c.keys is None or c.keys.shape[2] < end]
        if not short and not full:  # most steps: nothing to do
            return False
        like = torch.empty((1, self.args.n_kv_heads, 0, self.args.head_dim), dtype=dtype, device=device)
        before = [None if t.rows is None else t.rows.data_ptr() for t in tables]
        for t in short:
            t(0, end + ahead, device)
        moved = [c.reserve(end + ahead, like) for c in full]
        return any(moved) or before != [t.rows.data_ptr() for t in tables]

    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache: list[Cache]) -> torch.Tensor:
        """One decode step for B rows, each at its own position: tokens [B] and positions [B] (device
        tensors) -> logits [B, V] float32. Fixed shapes, no host reads or writes (the caller keeps the
        caches' offsets and made room with `prepare_decode`), so the step can be captured as a CUDA graph;
        no Python side effects either, so the compiled CPU step can be replayed (`torch_backend.replay`)."""
        h = self.embed(tokens[:, None])  # [B] -> [B, 1, D]
        pos = Positions.for_decode(self.args, self.rope, self.temperatures, positions)
        for layer, c in zip(self.layers, cache, strict=True):
            h = layer(h, pos, c)
        return self.project(self.norm(h))[:, 0]  # [B, 1, V] -> [B, V]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, L, D]; a rank of a tensor-parallel world holds the rows of its vocabulary
        range, so it looks up its own ids, zeroes the others, and the ranks' rows are summed."""
        if self.world is None:
            return self.tok_embeddings(tokens)
        V = self.args.vocab_size  # this rank's share
        local = tokens - self.world.rank * V
        inside = (local >= 0) & (local < V)
        h = self.tok_embeddings(local.clamp(0, V - 1)) * inside[..., None].to(self.tok_embeddings.weight.dtype)
        return self.world.all_sum(h)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] of normed hidden states; tensor-parallel ranks gather their vocabulary ranges."""
        w = self._output.weight()
        if self._output.quant is not None:
            logits = self._output.quant.mm(h).float()
        else:
            logits = (self.output(h) if w is None else linear(h, w)).float()
        return logits if self.world is None else self.world.all_gather_last(logits)

    def attach_world(self, world: Any) -> None:
        """Run as one rank of a tensor-parallel world (`torch_backend.distributed.World`); the model must
        hold that rank's share (`common.tensor_parallel.Layout.local_args`)."""
        self.world = world
        for layer in self.layers:
            layer.reduce = world.all_sum

    def _merge_image(self, h: torch.Tensor, image: MaskedEmbedding) -> torch.Tensor:
        """Token embeddings with the projected image features at the masked (`<|patch|>`) rows."""
        if self.args.vision_args is None:
            raise ValueError("TransformerInput.image_embedding given, but this model has no vision encoder")
        B, L, _ = h.shape
        out_dim = self.args.vision_args.output_dim
        if tuple(image.embedding.shape) != (B, L, out_dim) or tuple(image.mask.shape) != (B, L, 1):
            raise ValueError(f"image_embedding: expected embedding [{B}, {L}, {out_dim}] and mask [{B}, {L}, 1], "
                             f"got {list(image.embedding.shape)} and {list(image.mask.shape)}")
        projected = self.vision_projection(image.embedding.to(device=h.device, dtype=h.dtype))  # [B, L, D]
        return torch.where(image.mask.to(device=h.device, dtype=torch.bool), projected, h)
