"""MLX-quantized weights kept quantized in torch, for packed-integer kernels (CPU and CUDA).

On the CPU, where the project's own kernels are built (`torch_backend.cpu_kernels`, layout "native"),
the weights keep MLX's codes with their per-group scales and biases (in the folder's dtype) and
products of up to `cpu_kernels.QUANT_MAX_ROWS` rows run the project's kernels in float32 with the
activations in the model's dtype (a row or two: MLX's affine form; more: the dequantized weight a
block at a time); products of more rows (prefill) dequantize the weight into float32 and run the
float32 GEMM. Elsewhere (layout "torch"), torch's kernels:
- 4 bits: `torch._weight_int4pack_mm_for_cpu` (CPU) and `torch._weight_int4pack_mm` (CUDA) take int4
  codes with a scale and a zero per group of inputs, w = (q - 8) * scale + zero; MLX's affine
  w = q * scale + bias is that form exactly with zero = bias + 8 * scale (the codes are the same).
  The CUDA kernel reads the codes two to a byte, tiled in 8 outputs by 16 inputs: N % 8 == 0 and
  K % 32 == 0 (`fits`).
- 8 bits: `torch._weight_int8pack_mm` (CPU) takes one scale per output row, symmetric. MLX's
  per-group affine weights are re-quantized to it: w ~ round(w / s) * s with s = max|w| / 127 per
  row. On CUDA, and for many rows on the CPU, the same int8 codes and row scales go through the
  bfloat16 GEMM (`INT8_GEMM_ROWS`).

Torch's kernels run with bfloat16 activations (on the CPU they are 20-50x slower with float32 or
float16 ones), so a "torch" product casts its input to bfloat16 and its output back. Stacks of experts
keep one packed matrix per expert. On CUDA a kernel is used only once a probe product on that device
matched the dequantized weight (`kernels_available`), else the weights are dequantized at load.
Shapes: N outputs, K inputs, G group size, E experts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.quant import unpack
from torch_backend import cpu_kernels

KERNEL_DTYPE = torch.bfloat16
# From this many rows on (prefills), 8-bit products on the CPU widen the codes and run the bfloat16
# GEMM: torch's int8 kernel costs about one matrix-vector product per row (a [3072, 1024] weight, 2
# cores: 4.8 ms against 1.1 ms at 128 rows, even at 16). On CUDA it is always the GEMM: there the int8
# kernel took 1.1-1.7x as long at one row and 30-250x at 512 rows (H100).
INT8_GEMM_ROWS = 32
# From this many rows on, 4-bit products on the CPU unpack the weight into bfloat16 and run the GEMM:
# the int4 kernel too costs about a matrix-vector product per row ([3072, 1024]: 4.5 ms against 2.3
# at 128 rows, 17.6 against 5.2 at 512; the two cross near 64 rows for the small model's shapes).
INT4_GEMM_ROWS = 64
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes both int4 kernels take


def kernels_available(bits: int, group_size: int, device: torch.device | str = "cpu") -> bool:
    """Whether this torch has a packed kernel for `bits` and `group_size` on `device`: on the CPU the
    kernels' presence, on CUDA a probe product that ran and matched (once per device and spec)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _probe(device, bits, group_size)
    if device.type != "cpu":
        return False
    if cpu_kernels.available() and bits in (4, 8) and group_size % cpu_kernels.QUANT_BLOCK == 0:
        return True
    if bits == 8:
        return hasattr(torch, "_weight_int8pack_mm")
    return (bits == 4 and group_size in INT4_GROUPS and hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"))


def fits(bits: int, n: int, k: int, device: torch.device, group_size: int = 32) -> bool:
    """Whether an [N, K] weight fits the kernel's tiles on `device` (CUDA int4: 8 outputs by 32 inputs;
    the CPU: whole groups, for either layout)."""
    if device.type == "cpu":
        return k % group_size == 0
    return bits != 4 or (n % 8 == 0 and k % 32 == 0)


def native(bits: int, group_size: int, k: int, device: torch.device) -> bool:
    """Whether weights of this spec over `k` inputs on `device` take the project's CPU kernels."""
    return device.type == "cpu" and cpu_kernels.available() and cpu_kernels.quant_fits(bits, group_size, k)


@functools.cache
def _probe(device: torch.device, bits: int, group_size: int) -> bool:
    """A [64, K] product through the packed kernel on `device` against the dequantized weight's: the
    kernel must run (CUDA's int4 kernel needs compute capability 8.0) and read the codes as packed here."""
    if bits not in (4, 8) or (bits == 4 and group_size not in INT4_GROUPS):
        return False
    gen = torch.Generator().manual_seed(0)
    n, k = 64, max(256, 2 * group_size)
    q = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    s = torch.rand((n, k // group_size), generator=gen) / 64 + 1 / 256
    b = -s * (1 << (bits - 1)) + torch.randn((n, k // group_size), generator=gen) / 256
    w = affine(q, s, b)
    x = torch.randn((3, k), generator=gen).to(KERNEL_DTYPE).float()
    want = x @ w.T
    try:
        got = QWeight.from_affine([(q, s, b)], bits, group_size, False, device, "torch").mm(x.to(device)).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        return False
    return bool(((got - want).abs().max() <= 0.03 * want.abs().max()).item())


def codes(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX's packed uint32 words [..., N, K*bits/32] -> integer codes [..., N, K] (int32)."""
    words = wq.view(torch.int32)  # same bits; torch's uint32 has few kernels
    if 32 % bits:  # values straddle words: the numpy reference
        return torch.from_numpy(unpack(words.numpy().view(np.uint32), bits).view(np.int32))
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    # Arithmetic shifts copy the sign bit down, which the mask removes.
    q = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, 32 / bits]
    return q.flatten(-2)  # [..., W * 32 / bits]


def affine(q: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MLX's affine weight q * s + b in float32 from codes q [N, K] and per-group s, b [N, K/G]."""
    groups = q.view(q.shape[0], s.shape[1], -1).float()  # [N, K] -> [N, K/G, G]
    return (groups * s[..., None] + b[..., None]).flatten(1)  # [N, K/G, G] -> [N, K]


def entry(stack: torch.Tensor, e: int | torch.Tensor | None) -> torch.Tensor:
    """Entry `e` of a stack [E, ...]: a view for an int, a copy for a one-element id tensor on the device
    (no host read, so a CUDA graph captures it); the whole tensor for None."""
    if e is None:
        return stack
    return stack.index_select(0, e)[0] if isinstance(e, torch.Tensor) else stack[e]


@dataclass
class QWeight:
    """A weight [N, K], or a stack [E, N, K], kept quantized."""

    bits: int
    group_size: int
    # native: [(E,) N, K * bits / 8] uint8 (`cpu_kernels.pack`); torch 4 bits: [(E,) N, K/2] uint8 in the
    # kernel's layout; torch 8 bits: [(E,) N, K] int8
    packed: torch.Tensor
    # native: [(E,) N, K/G, 2] (scale, bias) in the folder's dtype; torch 4 bits: [(E,) K/G, N, 2]
    # (scale, zero); torch 8 bits: [(E,) N]; bfloat16
    scales: torch.Tensor
    layout: str = "torch"  # or "native"

    @classmethod
    def from_affine(cls, entries: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], bits: int,
                    group_size: int, stacked: bool, device: torch.device | str = "cpu",
                    layout: str | None = None) -> QWeight:
        """From (integer codes q [N, K], MLX's per-group scales and biases [N, K/G], on the CPU) of one
        weight, or of each entry of a stack (`stacked`), packed for `device` one entry at a time so the
        temporaries stay one entry big. `layout`: "native" or "torch"; by default native where it fits."""
        device = torch.device(device)
        packed, params = [], []
        for q, s, b in entries:
            if layout is None:
                layout = "native" if native(bits, group_size, q.shape[1], device) else "torch"
            if layout == "native":
                packed.append(cpu_kernels.pack(q, bits))
                params.append(torch.stack([s, b], dim=-1))  # [N, K/G, 2]
                continue
            s, b = s.float(), b.float()
            if bits == 4:
                packed.append(_pack_int4(q, device))
                params.append(torch.stack([s.t(), (b + 8 * s).t()], dim=-1).to(device, KERNEL_DTYPE))  # [K/G, N, 2]
            else:
                w = affine(q, s, b)  # then one symmetric scale per output row
                row = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # [N]
                packed.append(torch.round(w / row[:, None]).clamp(-127, 127).to(device, torch.int8))
                params.append(row.to(device, KERNEL_DTYPE))
        if not stacked:
            return cls(bits, group_size, packed[0], params[0], layout or "torch")
        return cls(bits, group_size, torch.stack(packed), torch.stack(params), layout or "torch")

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def mm(self, x: torch.Tensor, e: int | torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] (entry `e` of a stack: an int, or a one-element id tensor on the
        device, whose entry is copied out without a host read), in x's dtype."""
        packed, scales = entry(self.packed, e), entry(self.scales, e)
        if self.layout == "native":
            if x.numel() // x.shape[-1] <= cpu_kernels.QUANT_MAX_ROWS:
                return cpu_kernels.quant_gemv(x, packed, scales, self.bits, self.group_size)
            # prefill: MLX's float32 weight and the float32 GEMM (a bfloat16 weight would round it: on the
            # 8-bit demo model that alone moved greedy tokens off MLX's)
            return cpu_kernels.quant_mm(x, packed, scales, self.bits, self.group_size)
        x2 = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()  # [..., K] -> [M, K]
        if self.bits == 4 and packed.device.type == "cpu" and x2.shape[0] >= INT4_GEMM_ROWS and _cpu_blocks(packed):
            y = x2 @ _unpacked_t(packed, scales, self.group_size)  # [M, K] @ [K, N]
        elif self.bits == 4:
            mm4 = torch._weight_int4pack_mm_for_cpu if packed.device.type == "cpu" else torch._weight_int4pack_mm
            y = mm4(x2, packed, self.group_size, scales)
        elif packed.device.type != "cpu" or x2.shape[0] >= INT8_GEMM_ROWS:
            # The codes widened to a bfloat16 temporary (exact) through the GEMM, scaled per output row.
            y = F.linear(x2, packed.to(KERNEL_DTYPE)) * scales
        else:
            y = torch._weight_int8pack_mm(x2, packed, scales)
        return y.to(x.dtype).view(*x.shape[:-1], -1)  # [M, N] -> [..., N]


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Codes q [N, K] (0..15) in the int4 kernel's layout on `device`."""
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    k = q.shape[1]
    inner = next(t for t in (8, 4, 2) if k % (16 * t) == 0)  # k-tiles of 16 per 32-bit load: the widest that fit
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K] -> [N, K/2], even inputs in the high nibble
    return torch._convert_weight_to_int4pack(pairs.to(device), inner)


def _unpacked_t(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The CPU int4 layout unpacked into the bfloat16 weight's transpose w.T [K, N]. That layout is
    [N/64, K, 32] bytes: outputs 0-31 of each block of 64 in the low nibbles, 32-63 in the high ones."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // 64, k, 32)
    q = torch.cat([b & 15, b >> 4], dim=-1).to(KERNEL_DTYPE)  # [N/64, K, 64]
    q = q.transpose(0, 1).reshape(k // group_size, group_size, n // 64, 64)  # a view: [K/G, G, N/64, 64]
    # scale and zero [K/G, N, 2] -> [K/G, 1, N/64, 64] each; w = (q - 8) * scale + zero
    s = scales[..., 0].contiguous().view(k // group_size, 1, n // 64, 64)
    z = (scales[..., 1] - 8 * scales[..., 0]).view(k // group_size, 1, n // 64, 64)
    # out of place into fresh [K, N] storage (reading q transposed); in-place broadcasting was 4x slower
    w = torch.empty((k // group_size, group_size, n // 64, 64), dtype=KERNEL_DTYPE)
    return torch.addcmul(z, q, s, out=w).view(k, n)


def _cpu_blocks(packed: torch.Tensor) -> bool:
    """Whether `_unpacked_t` reads this packed weight: outputs in whole blocks of 64, and this torch's
    CPU packing lays them out as it expects (checked once)."""
    return packed.shape[0] % 64 == 0 and _cpu_layout_known()


@functools.cache
def _cpu_layout_known() -> bool:
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    scales = torch.tensor([1.0, 8.0], dtype=KERNEL_DTYPE).expand(1, 128, 2)  # w = (q - 8) + 8 = q
    try:
        w = _unpacked_t(torch._convert_weight_to_int4pack_for_cpu(q, 1), scales, 64)  # [64, 128]
    except (RuntimeError, ValueError):
        return False
    return torch.equal(w.t().int(), q)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take: parameters, buffers and packed groups."""
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    for module in model.modules():
        for group in getattr(module, "fused_groups", tuple)():
            total += group.quant.nbytes if group.quant is not None else 0
    return total
