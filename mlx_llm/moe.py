"""Feed-forward layers: dense SwiGLU and the Llama 4 mixture of experts (sigmoid top-k routing
that scales each expert's input, plus an always-on shared expert).

Shapes: N token slots (tokens x top_k), T tokens, D model dim, F hidden dim, E experts, k top_k.
"""

from __future__ import annotations

from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn

from common.args import ModelArgs
from mlx_llm.fused import FusedRows
from mlx_llm.parallel import linear, split_outputs

# Above this many token slots the slots are sorted by expert, so each expert's rows are contiguous.
SORT_MIN_SLOTS = 8


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, value: mx.array) -> mx.array:
    """silu(gate) * value as one fused kernel."""
    return nn.silu(gate) * value


def split_swiglu(gate_value: mx.array) -> mx.array:
    """swiglu of a fused [..., 2F] gate|value product -> [..., F]."""
    gate, value = mx.split(gate_value, 2, axis=-1)  # each [..., F]
    return swiglu(gate, value)


class FeedForward(nn.Module):
    """SwiGLU: w_out(silu(w_gate(x)) * w_value(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_value = nn.Linear(dim, hidden_dim, bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)
        self._gate_value = FusedRows(self, ("w_gate", "w_value"))

    def fuse(self) -> None:
        """Store w_gate|w_value as one matrix: one product per call."""
        self._gate_value.fuse()

    def __call__(self, x: mx.array) -> mx.array:
        if self._gate_value.current() is not None:
            return linear(self.w_out, split_swiglu(self._gate_value(x)))
        return linear(self.w_out, swiglu(linear(self.w_gate, x), linear(self.w_value, x)))


@cache
def _gather_mm_supports(dtype: mx.Dtype, device: str) -> bool:
    # mlx's CPU gather_mm handles float32 only; ask once per dtype and device.
    try:
        mx.eval(mx.gather_mm(mx.ones((1, 1, 2), dtype=dtype), mx.ones((1, 2, 2), dtype=dtype),
                             rhs_indices=mx.array([0])))
    except (ValueError, RuntimeError):
        return False
    return True


class Experts(nn.Module):
    """E SwiGLU experts stored as [E, out, in] arrays; only the selected experts are read."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = mx.zeros((num_experts, hidden_dim, dim))
        self.w_value = mx.zeros((num_experts, hidden_dim, dim))
        self.w_out = mx.zeros((num_experts, dim, hidden_dim))
        self._gate_value = FusedRows(self, ("w_gate", "w_value"))

    def fuse(self) -> None:
        """Store each expert's w_gate|w_value as one [2F, D] matrix: one gather_mm per call."""
        self._gate_value.fuse()

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """x [N, D] (already scaled by the routing score), experts [N] -> [N, D]."""
        return self.apply_experts(x, experts, sort=experts.size > SORT_MIN_SLOTS)

    def apply_experts(self, x: mx.array, experts: mx.array, sort: bool) -> mx.array:
        if sort:
            order = mx.argsort(experts)  # [N]
            y = self._matmuls(x[order], experts[order], sorted_indices=True)  # rows in expert order
            return y[mx.argsort(order)]  # back to slot order [N, D]
        return self._matmuls(x, experts, sorted_indices=False)

    def _matmuls(self, x: mx.array, experts: mx.array, sorted_indices: bool) -> mx.array:
        # Each product is rounded to the model dtype, as a native low-precision gather_mm would.
        x = x[:, None, :]  # [N, 1, D]
        gate_value = self._gate_value.current()
        if gate_value is not None:
            h = split_swiglu(_product(x, gate_value, experts, sorted_indices))  # [N, 1, 2F] -> [N, 1, F]
        else:
            h = swiglu(_product(x, self.w_gate, experts, sorted_indices),
                       _product(x, self.w_value, experts, sorted_indices))  # [N, 1, F]
        return _product(h, self.w_out, experts, sorted_indices)[:, 0, :]  # [N, 1, D] -> [N, D]


def _rows(w: mx.array, lo: int, hi: int) -> mx.array:
    return w if lo == 0 and hi == w.shape[-2] else w[..., lo:hi, :]  # [E, hi-lo, in]


def _product(a: mx.array, w: mx.array | nn.Module, experts: mx.array, sorted_indices: bool) -> mx.array:
    """a [N, 1, in] times each slot's expert of `w` ([E, out, in], or a quantized stack running its
    own gather_qmm) -> [N, 1, out], split by output features over the CPU streams."""
    dtype = a.dtype
    num_experts, rows, cols = w.shape
    if isinstance(w, nn.Module):
        def part(lo: int, hi: int) -> mx.array:
            return w.gather(a, experts, sorted_indices, lo, hi)
    else:
        compute = dtype if _gather_mm_supports(dtype, str(mx.default_device())) else mx.float32
        if compute != dtype and experts.size < num_experts:
            # Few slots: gather the experts' weights, then cast only those to float32.
            def part(lo: int, hi: int) -> mx.array:
                wp = w[experts, lo:hi].astype(compute).swapaxes(-1, -2)  # [N, out, in] -> [N, in, out]
                return (a.astype(compute) @ wp).astype(dtype)  # [N, 1, in] @ [N, in, out]
        else:
            def part(lo: int, hi: int) -> mx.array:
                wp = _rows(w, lo, hi).astype(compute).swapaxes(-1, -2)  # [E, in, out]
                y = mx.gather_mm(a.astype(compute), wp, rhs_indices=experts, sorted_indices=sorted_indices)
                return y.astype(dtype)
    return split_outputs(part, rows, experts.size * rows * cols)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.moe_args is None:
            raise ValueError("MoE: ModelArgs.moe_args is required for an MoE layer")
        D, F, E = args.dim, args.moe_hidden_dim, args.moe_args.num_experts
        self.top_k = args.moe_args.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, F)
        self.shared_expert = FeedForward(D, F)

    def fuse(self) -> None:
        self.experts.fuse()
        self.shared_expert.fuse()

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        k = self.top_k
        logits = linear(self.router, x)  # [T, E], model dtype
        experts = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]  # [T, k]
        picked = mx.take_along_axis(logits, experts, axis=-1)  # [T, k]
        scores = mx.sigmoid(picked.astype(mx.float32)).astype(x.dtype)  # no softmax, no renormalising
        routed = (x[:, None, :] * scores[..., None]).reshape(-1, shape[-1])  # input scaled: [T*k, D]
        y = self.experts(routed, experts.reshape(-1)).reshape(-1, k, shape[-1])  # [T, k, D]
        return (self.shared_expert(x) + y.sum(axis=1)).reshape(shape)
