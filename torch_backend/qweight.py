"""MLX-quantized weights kept quantized in torch, for its packed-integer CPU kernels.

- 4 bits: `torch._weight_int4pack_mm_for_cpu` takes int4 codes with a scale and a zero per group of
  inputs, w = (q - 8) * scale + zero; MLX's affine w = q * scale + bias is that form exactly with
  zero = bias + 8 * scale (the codes are the same).
- 8 bits: `torch._weight_int8pack_mm` takes one scale per output row, symmetric. MLX's per-group
  affine weights are re-quantized to it: w ~ round(w / s) * s with s = max|w| / 127 per row.

The kernels run with bfloat16 activations (they are 20-50x slower with float32 or float16 ones on
this CPU), so a quantized product casts its input to bfloat16 and its output back. Stacks of
experts keep one packed matrix per expert. Shapes: N outputs, K inputs, G group size, E experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from common.quant import unpack

KERNEL_DTYPE = torch.bfloat16


def kernels_available(bits: int, group_size: int) -> bool:
    """Whether this torch has the CPU kernel for `bits` (group sizes its int4 kernel takes)."""
    if bits == 8:
        return hasattr(torch, "_weight_int8pack_mm")
    return (bits == 4 and group_size in (32, 64, 128, 256) and hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"))


def codes(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX's packed uint32 words [..., N, K*bits/32] -> integer codes [..., N, K] (int32)."""
    words = wq.view(torch.int32)  # same bits; torch's uint32 has few kernels
    if 32 % bits:  # values straddle words: the numpy reference
        return torch.from_numpy(unpack(words.numpy().view(np.uint32), bits).view(np.int32))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # Arithmetic shifts copy the sign bit down, which the mask removes.
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, 32 / bits]
    return q.flatten(-2)  # [..., W * 32 / bits]


@dataclass
class QWeight:
    """A weight [N, K], or a stack [E, N, K], kept quantized."""

    bits: int
    group_size: int
    packed: torch.Tensor  # 4 bits: [(E,) N, K/2] uint8 in the kernel's layout; 8 bits: [(E,) N, K] int8
    scales: torch.Tensor  # 4 bits: [(E,) K/G, N, 2] (scale, zero); 8 bits: [(E,) N]; bfloat16

    @classmethod
    def from_affine(cls, entries: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: int,
                    group_size: int, stacked: bool) -> QWeight:
        """From (integer codes q [N, K], MLX's per-group scales and biases [N, K/G]) of one weight, or of each
        entry of a stack (`stacked`), converted one entry at a time so the temporaries stay one entry big."""
        packed, params = [], []
        for q, s, b in entries:
            s, b = s.float(), b.float()
            if bits == 4:
                packed.append(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
                params.append(torch.stack([s.t(), (b + 8 * s).t()], dim=-1).to(KERNEL_DTYPE))  # [K/G, N, 2]
            else:
                # [N, K] -> [N, K/G, G]: the affine values, then one symmetric scale per output row
                w = (q.view(q.shape[0], s.shape[1], -1).float() * s[..., None] + b[..., None]).flatten(1)
                row = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # [N]
                packed.append(torch.round(w / row[:, None]).clamp(-127, 127).to(torch.int8))
                params.append(row.to(KERNEL_DTYPE))
        if not stacked:
            return cls(bits, group_size, packed[0], params[0])
        return cls(bits, group_size, torch.stack(packed), torch.stack(params))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def mm(self, x: torch.Tensor, e: int | None = None) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] (expert `e` of a stack), in x's dtype."""
        packed = self.packed if e is None else self.packed[e]
        scales = self.scales if e is None else self.scales[e]
        x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)  # [..., K] -> [M, K]
        if self.bits == 4:
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales)
        else:
            y = torch._weight_int8pack_mm(x2, packed, scales)
        return y.to(x.dtype).view(*x.shape[:-1], -1)  # [M, N] -> [..., N]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take: parameters, buffers and packed groups."""
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    for module in model.modules():
        for group in getattr(module, "fused_groups", tuple)():
            total += group.quant.nbytes if group.quant is not None else 0
    return total
