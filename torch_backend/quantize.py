"""MLX quantized folders in torch.

On the CPU and CUDA, projections whose weights are all quantized in a form torch's packed-integer
kernels take on that device (CPU: 4 bits with group size 32-256, or 8 bits; CUDA: what its probe
product found working, `torch_backend.qweight.kernels_available`) stay packed, and so does the
embedding table: the model takes the memory of the quantized folder. Everything else (other bit
widths, other devices, `dequantize=True`, the router and the vision encoder) is dequantized into
the model's dtype at load (w = s * q + b, computed in float32, then cast once): the numbers of the
quantized weights with the memory of the float model. One 4-bit download thus serves both backends.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

import torch
from torch import nn

from common.args import ModelArgs, QuantizationArgs
from common.array_ops import LazyDict, shape_of
from common.names import canonical_shapes
from common.quant import declared_specs, infer_spec, part_names, quantized_tensors, require_declared
from torch_backend.fused import FusedModule
from torch_backend.qweight import QWeight, codes, fits, kernels_available

_CHUNK = 1 << 24  # values dequantized at a time, to bound the float32 temporaries


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, spec: QuantizationArgs,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight [..., out, in] in `dtype` from its packed parts, on their device."""
    *lead, groups = shape_of(scales)
    n = groups * spec.group_size
    wq, scales, biases = wq.reshape(-1, wq.shape[-1]), scales.reshape(-1, groups), biases.reshape(-1, groups)
    out = torch.empty((wq.shape[0], n), dtype=dtype, device=wq.device)  # [R, in], R = rows over all leading axes
    step = max(1, _CHUNK // n)
    for r in range(0, wq.shape[0], step):
        q = codes(wq[r : r + step], spec.bits).view(-1, groups, spec.group_size)  # [r, G, group]
        s, b = scales[r : r + step].float()[..., None], biases[r : r + step].float()[..., None]  # [r, G, 1]
        out[r : r + step] = (q.float() * s + b).view(-1, n).to(dtype)  # [r, G, group] -> [r, in]
    return out.view(*lead, n)  # [R, in] -> [..., out, in]


def dequantized(weights: Mapping[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype,
                kept: Collection[str] = ()) -> Mapping[str, torch.Tensor]:
    """Canonical `weights` with every quantized tensor replaced by its dequantized form, lazily; the
    `kept` ones (held packed by the model, see `keep_packed`) by a meta tensor of their shape."""
    shapes = canonical_shapes(args)
    names = quantized_tensors(weights, shapes)
    if not names:
        return weights
    require_declared(names, args)
    parts = {p for n in names for p in part_names(n)}
    thunks = {k: (lambda k=k: weights[k]) for k in weights if k not in parts}
    for name in names:
        thunks[name] = lambda name=name: _dequantize_named(weights, name, shapes[name], dtype)
    for name in kept:
        thunks[name] = lambda name=name: torch.empty(shapes[name], device="meta")
    return LazyDict(thunks)


def _dequantize_named(weights: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...],
                      dtype: torch.dtype) -> torch.Tensor:
    wq, scales, biases = (weights[p] for p in part_names(name))
    spec = infer_spec(name, shape, (shape_of(wq), shape_of(scales), shape_of(biases)))
    return dequantize(wq, scales, biases, spec, dtype)


def keep_packed(model: nn.Module, weights: Mapping[str, torch.Tensor], args: ModelArgs,
                dtype: torch.dtype, device: torch.device | str = "cpu") -> set[str]:
    """Hand the quantized weights of `model` (built on the meta device, not yet allocated) to packed
    kernels on `device` where they allow it: each fused group whose members are all quantized with one
    spec the kernels take (in shapes that fit their tiles) gets a `QWeight` (`FusedGroup.quant`), a
    quantized embedding becomes a `QEmbedding`. Returns the canonical names now held packed;
    `dequantized(..., kept=...)` passes over them."""
    device = torch.device(device)
    specs = declared_specs(weights, args)
    if not specs:
        return set()
    shapes = canonical_shapes(args)
    canonical = {id(p): n for n, p in model.named_parameters()}
    kept: set[str] = set()
    for module in model.modules():
        for group in module.fused_groups() if isinstance(module, FusedModule) else ():
            if not group.packable:
                continue
            members = [canonical[id(getattr(*m))] for m in group.members]
            extra = [canonical[id(getattr(*m))] for m in group.extra]
            found = {specs.get(n) for n in members + extra}
            spec = found.pop() if len(found) == 1 else None
            if spec is None or not kernels_available(spec.bits, spec.group_size, device):
                continue
            rows = sum(shapes[n][-2] for n in members)  # N of the fused product
            if not fits(spec.bits, rows, shapes[members[0]][-1], device, spec.group_size):
                continue
            stacked = len(shapes[members[0]]) == 3
            count = shapes[members[0]][0] if stacked else 1
            entries = (_side_by_side(weights, members, spec.bits, e if stacked else None) for e in range(count))
            if extra:
                entries = itertools.chain(entries, [_side_by_side(weights, extra, spec.bits, None)])
            group.quant = QWeight.from_affine(entries, spec.bits, spec.group_size, stacked, device)
            kept.update(members + extra)
    spec = specs.get("tok_embeddings.weight")
    if spec is not None and (device.type == "cpu" or 32 % spec.bits == 0):  # other widths unpack through numpy
        # off the file: a copy on the CPU, a transfer elsewhere
        wq, scales, biases = (weights[p].to(device, copy=True) for p in part_names("tok_embeddings.weight"))
        model.tok_embeddings = QEmbedding(wq, scales, biases, spec, dtype)
        kept.add("tok_embeddings.weight")
    return kept


def _side_by_side(weights: Mapping[str, torch.Tensor], names: list[str], bits: int,
                  e: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [sum N, K], scales, biases [sum N, K/G]) of quantized tensors `names` (entry e of each stack)
    stacked along their outputs, in member order (the order of the fused float storage)."""
    parts: list[list[torch.Tensor]] = [[], [], []]
    for name in names:
        for i, key in enumerate(part_names(name)):
            t = weights[key] if e is None else weights[key][e]
            parts[i].append(codes(t, bits) if i == 0 else t)
    return tuple(torch.cat(p) if len(p) > 1 else p[0] for p in parts)  # type: ignore[return-value]


class QEmbedding(nn.Module):
    """An embedding table kept as MLX's packed rows; a lookup dequantizes only the rows it reads."""

    def __init__(self, wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, spec: QuantizationArgs,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.spec, self.dtype = spec, dtype
        # An empty stand-in where code asks the embedding for the model's device and dtype.
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=wq.device), requires_grad=False)
        self.register_buffer("wq", wq.view(torch.int32), persistent=False)  # [V, D*bits/32], uint32 bits
        self.register_buffer("scales", scales, persistent=False)  # [V, D/G]
        self.register_buffer("biases", biases, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.wq[flat], self.scales[flat], self.biases[flat], self.spec, self.dtype)  # [T, D]
        return rows.view(*ids.shape, -1)  # [T, D] -> [..., D]
