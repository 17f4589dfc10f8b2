"""Quantized layers in MLX's affine format: linears, the embedding and expert stacks.

Which layers are quantized is read from the checkpoint, not chosen here: a tensor is swapped for
its quantized layer where its `scales` are present (names in `common.quant`), with the bits and
group size its parts' shapes encode. Expert stacks multiply only the selected experts, with
`mx.gather_qmm`.

Shapes: N token slots, E experts, O output width, I input width, G groups per row (I / group_size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.args import QuantizationArgs
from common.array_ops import CheckpointError
from common.quant import packed_shapes, quant_prefix


def compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """float32 for half-precision inputs on the CPU, where MLX's quantized kernels in float16 and
    bfloat16 are 10-35x slower than in float32; the dtype itself elsewhere."""
    if dtype in (mx.float16, mx.bfloat16) and mx.default_device().type == mx.cpu:
        return mx.float32
    return dtype


class _Packed(nn.Module):
    """The packed weight [..., O, I*bits/32] (uint32) with scales and biases [..., O, G]."""

    def __init__(self, shape: tuple[int, ...], spec: QuantizationArgs) -> None:
        super().__init__()
        self.group_size, self.bits = spec.group_size, spec.bits
        w, s, b = packed_shapes(shape, spec)
        self.weight = mx.zeros(w, dtype=mx.uint32)
        self.scales = mx.zeros(s)
        self.biases = mx.zeros(b)

    def _parts(self, dtype: mx.Dtype, lo: int = 0, hi: int | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """weight, scales and biases of output rows lo .. hi-1 (all by default), scales in `dtype`."""
        w, s, b = self.weight, self.scales, self.biases
        if lo or hi is not None:  # groups run along the input axis, so any output rows can be taken
            w, s, b = w[..., lo:hi, :], s[..., lo:hi, :], b[..., lo:hi, :]
        return w, s.astype(dtype), b.astype(dtype)


class QuantizedLinear(_Packed):
    """y = x @ W.T with W [O, I] quantized."""

    def __init__(self, in_dims: int, out_dims: int, spec: QuantizationArgs) -> None:
        super().__init__((out_dims, in_dims), spec)

    def __call__(self, x: mx.array) -> mx.array:
        return self.rows(x, 0, None)

    def rows(self, x: mx.array, lo: int, hi: int | None) -> mx.array:
        """Output features lo .. hi-1 of the product: [..., I] -> [..., hi - lo]."""
        c = compute_dtype(x.dtype)
        y = mx.quantized_matmul(x.astype(c), *self._parts(c, lo, hi), transpose=True, group_size=self.group_size,
                                bits=self.bits)
        return y.astype(x.dtype)


class QuantizedEmbedding(_Packed):
    """Rows of a quantized [V, D] table, dequantized on lookup."""

    def __init__(self, num_embeddings: int, dims: int, spec: QuantizationArgs) -> None:
        super().__init__((num_embeddings, dims), spec)

    def __call__(self, ids: mx.array) -> mx.array:
        rows = (self.weight[ids], self.scales[ids], self.biases[ids])  # [..., packed], [..., G], [..., G]
        return mx.dequantize(*rows, group_size=self.group_size, bits=self.bits)  # [..., D]


class QuantizedStack(_Packed):
    """E experts' [O, I] weights, quantized; each slot is multiplied by its own expert's weight."""

    def __init__(self, shape: tuple[int, int, int], spec: QuantizationArgs) -> None:
        super().__init__(shape, spec)
        self.num_experts, self.out_dims, self.in_dims = shape

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical [E, O, I] shape, as an unquantized stack reports it."""
        return self.num_experts, self.out_dims, self.in_dims

    def gather(self, x: mx.array, experts: mx.array, sorted_indices: bool, lo: int = 0,
               hi: int | None = None) -> mx.array:
        """x [N, 1, I], experts [N] -> [N, 1, O] (output features lo .. hi-1 only, if given)."""
        c = compute_dtype(x.dtype)
        y = mx.gather_qmm(x.astype(c), *self._parts(c, lo, hi), rhs_indices=experts, transpose=True,
                          group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices)
        return y.astype(x.dtype)


def _quantized(current: Any, path: str, spec: QuantizationArgs) -> nn.Module:
    if isinstance(current, nn.Linear) and "bias" not in current:
        out_dims, in_dims = current.weight.shape
        return QuantizedLinear(in_dims, out_dims, spec)
    if isinstance(current, nn.Embedding):
        return QuantizedEmbedding(*current.weight.shape, spec)
    if isinstance(current, mx.array) and current.ndim == 3:
        return QuantizedStack(tuple(current.shape), spec)
    raise CheckpointError(f"{path}: the checkpoint holds it quantized, but the model's {type(current).__name__} "
                          f"there has no quantized form")


def quantize_modules(model: nn.Module, specs: Mapping[str, QuantizationArgs]) -> None:
    """Swap each tensor named in `specs` (canonical name -> spec) for its quantized layer, in place."""
    for name, spec in specs.items():
        path = quant_prefix(name)
        *parents, key = path.split(".")
        parent: Any = model
        for p in parents:
            parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
        if isinstance(parent, list):
            parent[int(key)] = _quantized(parent[int(key)], path, spec)
        else:
            setattr(parent, key, _quantized(getattr(parent, key), path, spec))
