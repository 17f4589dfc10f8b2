"""Projections that read the same input, stored as one matrix of stacked output rows (q|k|v,
gate|value): one product (or one gather_mm / gather_qmm) per call instead of several.

`FusedRows(owner, names)` groups the owner's linears (float or quantized) or raw [E, out, in]
expert stacks. `fuse()` concatenates their arrays along the output axis (-2: weights, and the
scales and biases of quantized ones, are all row-major by output) and re-points each canonical
array to its slice, so parameter names, shapes and values are unchanged and the weights exist
once. The fused form is used while the canonical arrays are still those slices; once anything
replaced them (`load_weights`, `set_dtype`, re-quantizing), calls fall back to one product per
member, so results stay right without a new `fuse()`.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from common.args import QuantizationArgs
from mlx_llm.parallel import linear
from mlx_llm.quantize import QuantizedLinear, QuantizedStack


def _arrays(member: Any) -> dict[str, mx.array]:
    """The arrays of one member: a raw array, or a layer's weight (+ scales and biases)."""
    if isinstance(member, mx.array):
        return {"": member}
    return {k: v for k, v in member.items() if isinstance(v, mx.array)}


def _like(member: Any, rows: int) -> Any:
    """An empty layer of the member's kind with `rows` outputs; None for kinds kept separate."""
    if isinstance(member, QuantizedStack):
        return QuantizedStack((member.num_experts, rows, member.in_dims), _spec(member))
    if isinstance(member, QuantizedLinear):
        return QuantizedLinear(member.weight.shape[-1] * 32 // member.bits, rows, _spec(member))
    if isinstance(member, nn.Linear) and "bias" not in member:
        return nn.Linear(member.weight.shape[-1], rows, bias=False)
    return None


def _spec(member: Any) -> QuantizationArgs:
    return QuantizationArgs(group_size=member.group_size, bits=member.bits)


class FusedRows:
    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, names
        self.fused: Any = None  # a layer of the members' kind, or an array for raw stacks
        self._views: list[tuple[str, Any, dict[str, mx.array]]] = []

    def members(self) -> list[Any]:
        return [self.owner[n] for n in self.names]

    def fuse(self) -> None:
        """Concatenate the members along their output axis and make each a slice of the result."""
        members = self.members()
        parts = [_arrays(m) for m in members]
        keys = parts[0].keys()
        rows = sum(p[next(iter(keys))].shape[-2] for p in parts)
        fused = members[0] if isinstance(members[0], mx.array) else _like(members[0], rows)
        alike = all(type(m) is type(members[0]) and p.keys() == keys for m, p in zip(members, parts, strict=True))
        if fused is None or not alike:
            return  # members that cannot share one layer stay separate
        joined = {k: mx.concatenate([p[k] for p in parts], axis=-2) for k in keys}  # [..., sum O, *]
        mx.eval(joined)
        views, start = [], 0
        for name, member, p in zip(self.names, members, parts, strict=True):
            n = p[next(iter(keys))].shape[-2]
            sliced = {k: v[..., start : start + n, :] for k, v in joined.items()}  # [..., O, *] views
            mx.eval(sliced)
            if isinstance(member, mx.array):
                self.owner[name] = sliced[""]
            else:
                member.update(sliced)
            views.append((name, self.owner[name], sliced))
            start += n
        if isinstance(fused, mx.array):
            fused = joined[""]
        else:
            fused.update(joined)
        self.fused, self._views = fused, views

    def current(self) -> Any:
        """The fused layer (or array) while every member still holds its slice, else None."""
        if self.fused is None:
            return None
        for name, member, sliced in self._views:
            now = self.owner[name]
            if now is not member:
                return None
            if isinstance(now, mx.array):
                if now is not sliced[""]:
                    return None
            elif any(now[k] is not v for k, v in sliced.items()):
                return None
        return self.fused

    def __call__(self, x: mx.array) -> mx.array:
        """The members' outputs side by side [..., sum O] (linear members only)."""
        fused = self.current()
        if fused is not None:
            return linear(fused, x)
        return mx.concatenate([linear(m, x) for m in self.members()], axis=-1)
