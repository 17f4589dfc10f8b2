"""Tensor parallelism, backend-neutral: which part of every canonical tensor a rank holds, the
model config of one rank's share, and clear errors for layouts that cannot work.

Meta's model-parallel layout: attention heads split across ranks (KV heads too; with more ranks
than KV heads, each rank holds the one KV head its query heads read, as Meta's reference
replicates them), dense and expert FFNs split on the hidden dimension (gate / value by rows, the
output projection by columns), embedding and output split on the vocabulary, norms and router
replicated. Quantized triples (weight, scales, biases) split like their weight.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common import array_ops as ops
from common.args import ModelArgs
from common.array_ops import Array, LazyDict
from common.meta_checkpoint import meta_shards_to_canonical, meta_to_canonical, shard_axis
from common.vision_checkpoint import is_vision_name

_STACK = re.compile(r"(.+\.experts\.w_(?:gate|value|out))(?:\.(?:weight|scales|biases))?")
_QUANT = re.compile(r"(.+)\.(?:scales|biases)")
_KV = re.compile(r"layers\.\d+\.attention\.w[kv]\.(?:weight|scales|biases)")


def _layout_name(name: str) -> str:
    """The canonical name whose model-parallel axis `name` follows (a quantized part follows its weight)."""
    m = _STACK.fullmatch(name)
    if m is not None:
        return m[1]
    m = _QUANT.fullmatch(name)
    return name if m is None else m[1] + ".weight"


class LayoutError(ValueError):
    """A model that cannot be split over this many ranks."""


@dataclass(frozen=True)
class Layout:
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise LayoutError(f"rank {self.rank} is outside a world of {self.size}")

    def kv_heads(self, args: ModelArgs) -> int:
        """KV heads each rank holds: K / N, or 1 (replicated) when there are more ranks than KV heads."""
        return max(args.n_kv_heads // self.size, 1)

    def check(self, args: ModelArgs) -> None:
        """A LayoutError naming the numbers where `args` does not split over `size` ranks."""
        N, H, K = self.size, args.n_heads, args.n_kv_heads
        need = [(H % N == 0, f"n_heads {H} is not divisible by the world size {N}"),
                (K % N == 0 or N % K == 0, f"n_kv_heads {K} and the world size {N}: one must divide the other"),
                (args.ffn_hidden_dim % N == 0, f"the dense hidden size {args.ffn_hidden_dim} is not divisible by {N}"),
                (args.moe_hidden_dim % N == 0, f"the expert hidden size {args.moe_hidden_dim} is not divisible by {N}"),
                (args.vocab_size % N == 0, f"vocab_size {args.vocab_size} is not divisible by the world size {N}")]
        q = args.quantization
        if q is not None:
            for name, width in (("dense hidden size", args.ffn_hidden_dim), ("expert hidden size", args.moe_hidden_dim),
                                ("attention width n_heads*head_dim", H * args.head_dim)):
                need.append((width == 0 or (width // N) % q.group_size == 0,
                             f"the {name} {width} over {N} ranks is not a multiple of the quantization group "
                             f"size {q.group_size}"))
        bad = [msg for ok, msg in need if not ok]
        if bad:
            raise LayoutError(f"cannot split this model over {N} ranks: " + "; ".join(bad))

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The config of one rank's share."""
        self.check(args)
        N = self.size
        return dataclasses.replace(args, n_heads=args.n_heads // N, n_kv_heads=self.kv_heads(args),
                                   ffn_hidden_dim=args.ffn_hidden_dim // N, moe_hidden_dim=args.moe_hidden_dim // N,
                                   vocab_size=args.vocab_size // N)

    def take(self, name: str, x: Array, args: ModelArgs) -> Array:
        """This rank's part of the full canonical tensor `name` (a view where the array allows)."""
        if name.startswith("vision_"):
            return x  # the image encoder runs whole on every rank
        axis = shard_axis(_layout_name(name))
        if axis is None:
            return x
        shape = ops.shape_of(x)
        if _KV.fullmatch(name) and self.size > args.n_kv_heads:
            head, unit = self.rank * args.n_kv_heads // self.size, shape[0] // args.n_kv_heads
            return ops.take(x, 0, head * unit, (head + 1) * unit)  # this rank's one (replicated) KV head
        size, rest = divmod(shape[axis], self.size)
        if rest:
            raise LayoutError(f"{name}: shape {list(shape)} does not split into {self.size} parts along axis {axis}")
        return ops.take(x, axis, self.rank * size, (self.rank + 1) * size)

    def shard(self, weights: Mapping[str, Array], args: ModelArgs) -> LazyDict:
        """Full canonical weights -> this rank's parts, each taken when it is read."""
        return LazyDict({k: (lambda k=k: self.take(k, weights[k], args)) for k in weights})


def vocab_range(layout: Layout, args: ModelArgs) -> tuple[int, int]:
    """The token ids [lo, hi) whose embedding rows and logits this rank holds (full-model args)."""
    n = args.vocab_size // layout.size
    return layout.rank * n, (layout.rank + 1) * n


def meta_rank_weights(read: Callable[[int], Mapping[str, Any]], n_files: int, args: ModelArgs,
                      layout: Layout) -> LazyDict:
    """This rank's canonical share of a Meta checkpoint of `n_files` shards (`read(i)` opens shard i).

    One shard per rank (and no more ranks than KV heads, whose replication the files do not hold):
    straight from the rank's own `consolidated.0r.pth`, whose split is this layout's; the image
    encoder, which runs whole on every rank, is merged from every shard. Otherwise the merged
    checkpoint, sliced lazily.
    """
    if n_files == layout.size and layout.size <= args.n_kv_heads:
        own = meta_to_canonical(read(layout.rank), args)
        thunks = {k: (lambda k=k: own[k]) for k in own if not is_vision_name(k)}
        if args.vision_args is not None:
            merged = meta_shards_to_canonical([read(i) for i in range(n_files)], args)
            thunks.update({k: (lambda k=k: merged[k]) for k in merged if is_vision_name(k)})
        return LazyDict(thunks)
    return layout.shard(meta_shards_to_canonical([read(i) for i in range(n_files)], args), args)
