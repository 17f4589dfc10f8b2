"""MLX quantized folders in torch: each quantized tensor is dequantized into the model's dtype at load.

torch has no kernels for MLX's packed affine format (`common.quant`), so the model runs in its
float dtype with the memory of the float model: the numbers are those of the quantized weights
(w = s * q + b, computed in float32, then cast once), the savings are not. One 4-bit download
thus serves both backends.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from common.args import ModelArgs, QuantizationArgs
from common.array_ops import LazyDict, shape_of
from common.names import canonical_shapes
from common.quant import infer_spec, part_names, quantized_tensors, require_declared, unpack

_CHUNK = 1 << 24  # values dequantized at a time, to bound the float32 temporaries


def _unpack(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [R, W] -> integers [R, W * 32 / bits] (int32)."""
    words = wq.view(torch.int32)  # same bits; torch's uint32 has few kernels
    if 32 % bits:
        return torch.from_numpy(unpack(words.numpy().view(np.uint32), bits).view(np.int32))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # Arithmetic shifts copy the sign bit down, which the mask removes.
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, 32 / bits]
    return q.flatten(-2)


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, spec: QuantizationArgs,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight [..., out, in] in `dtype` from its packed parts (on the CPU)."""
    *lead, groups = shape_of(scales)
    n = groups * spec.group_size
    wq, scales, biases = wq.reshape(-1, wq.shape[-1]), scales.reshape(-1, groups), biases.reshape(-1, groups)
    out = torch.empty((wq.shape[0], n), dtype=dtype)  # [R, in], R = rows over all leading axes
    step = max(1, _CHUNK // n)
    for r in range(0, wq.shape[0], step):
        q = _unpack(wq[r : r + step], spec.bits).view(-1, groups, spec.group_size)  # [r, G, group]
        s, b = scales[r : r + step].float()[..., None], biases[r : r + step].float()[..., None]  # [r, G, 1]
        out[r : r + step] = (q.float() * s + b).view(-1, n).to(dtype)  # [r, G, group] -> [r, in]
    return out.view(*lead, n)  # [R, in] -> [..., out, in]


def dequantized(weights: Mapping[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
                ) -> Mapping[str, torch.Tensor]:
    """Canonical `weights` with every quantized tensor replaced by its dequantized form, lazily."""
    shapes = canonical_shapes(args)
    names = quantized_tensors(weights, shapes)
    if not names:
        return weights
    require_declared(names, args)
    parts = {p for n in names for p in part_names(n)}
    thunks = {k: (lambda k=k: weights[k]) for k in weights if k not in parts}
    for name in names:
        thunks[name] = lambda name=name: _dequantize_named(weights, name, shapes[name], dtype)
    return LazyDict(thunks)


def _dequantize_named(weights: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...],
                      dtype: torch.dtype) -> torch.Tensor:
    wq, scales, biases = (weights[p] for p in part_names(name))
    spec = infer_spec(name, shape, (shape_of(wq), shape_of(scales), shape_of(biases)))
    return dequantize(wq, scales, biases, spec, dtype)
