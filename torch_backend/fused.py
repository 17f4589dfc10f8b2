"""Fused weight storage: one product per group of projections (q|k|v, gate|value), laid out
the way the device's matrix-vector kernels stream fastest.

A group's weights [..., O_i, I] live side by side in one contiguous tensor, and each canonical
parameter is a view of it: state_dict names, shapes and values are unchanged, and strict loading
copies into the views. The layout depends on where the weights live (`output_major`):
- float32 (and every accelerator): input-major [..., I, sum O], each parameter the view
  `storage[..., a:b].transpose(-1, -2)`. Measured on a 2-core x86 CPU (torch 2.13, one token): a
  [768, 512] projection streams at 13.5 GB/s stored input-major against 10 GB/s stored [out, in],
  an [8192, 512] one at 20.8 against 9.8.
- bfloat16 and float16 on the CPU: output-major [..., sum O, I], each parameter the plain slice
  `storage[..., a:b, :]`. Torch's own reduced-precision matrix-vector product (fp32 accumulation,
  reached with oneDNN switched off, see `linear`) streams contiguous [out, in] rows at 25-30 GB/s
  on that CPU, where oneDNN's takes 10-13 GB/s in either layout.

Modules that own groups derive from `FusedModule`: `.to()` and friends, and
`Transformer.load_state_dict(assign=True)` (through `refresh_fused`), rebuild the storage from the
parameters they leave behind. The fused tensor is used only with autograd off (inference); with
gradients on, the canonical parameters (views into the same memory) are used one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_backend import cpu_kernels

SPLIT_MIN_BYTES = 1 << 18  # smaller products gain less than the extra call costs
SPLIT_MIN_INPUTS = 128  # inputs per part, at least
SPLIT_MAX_ROWS = 4  # float32 CPU products of up to this many rows are split over threads
# Reduced-precision CPU products of up to this many rows skip oneDNN: a [1536, 512] bfloat16
# product took 110 / 157 / 273 us for 1 / 2 / 3 rows that way, against 212-236 us with oneDNN.
NATIVE_MAX_ROWS = 2
REDUCED = (torch.bfloat16, torch.float16)


def output_major(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a group on `device` in `dtype` stores its weights [..., sum O, I] (else [..., I, sum O])."""
    return device.type == "cpu" and dtype in REDUCED


class FusedGroup:
    """Parameters (module, attribute name) stored side by side along the output axis.

    With `extra` (one 2-D parameter per member, e.g. the shared expert's beside the routed experts'
    [E, O_i, I] stacks), the storage gains one more entry on the leading axis: [E + 1, ...], the
    extra parameters being entry E, so one strided view reaches any expert and the shared one.
    """

    def __init__(self, members: Sequence[tuple[nn.Module, str]], extra: Sequence[tuple[nn.Module, str]] = (),
                 packable: bool = True) -> None:
        self.members, self.extra = tuple(members), tuple(extra)
        self.packable = packable  # may hold its weights packed (`quant`) when a quantized folder is loaded
        if self.extra and len(self.extra) != len(self.members):
            raise ValueError(f"FusedGroup: {len(self.extra)} extra parameters for {len(self.members)} members")
        self.storage: torch.Tensor | None = None  # [..., I, sum O], or [..., sum O, I] when output-major
        self.quant: Any = None  # a `torch_backend.qweight.QWeight` holding the members quantized instead
        self.refresh()

    def _params(self) -> list[torch.Tensor]:
        return [getattr(m, name) for m, name in self.members]

    def _slots(self, storage: torch.Tensor) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """(module, name, the view of `storage` that parameter is) for every member and extra."""
        out, start = [], 0
        for i, p in enumerate(self._params()):
            rows = p.shape[-2]
            if output_major(storage.device, storage.dtype):
                view = storage[..., start : start + rows, :]  # [..., O, I]
            else:
                view = storage[..., start : start + rows].transpose(-1, -2)  # [..., I, O] -> [..., O, I]
            if self.extra:
                out.append((*self.extra[i], view[-1]))  # entry E: [O, I]
                view = view[:-1]  # entries 0 .. E-1: [E, O, I]
            out.append((*self.members[i], view))
            start += rows
        return out

    def _is_current(self) -> bool:
        if self.storage is None:
            return False
        for module, name, view in self._slots(self.storage):
            p = getattr(module, name)
            if p.device != view.device or p.dtype != view.dtype or p.data_ptr() != view.data_ptr() \
                    or p.shape != view.shape or p.stride() != view.stride():
                return False
        return True

    def refresh(self) -> None:
        """Re-point every member into fresh storage holding its current values (no-op if they are)."""
        if self.quant is None and not self._is_current():
            first = self._params()[0]
            self._place(first.device, first.dtype, copy=True)

    def allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        """Re-point every member into fresh, uninitialised storage (for loading into); a quantized group's
        members become empty placeholders (its weights live in `quant`)."""
        if self.quant is None:
            self._place(device, dtype, copy=False)
            return
        for module, name in (*self.members, *self.extra):
            setattr(module, name, nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False))

    def _place(self, device: torch.device, dtype: torch.dtype, copy: bool) -> None:
        params = self._params()
        lead, n_in, n_out = params[0].shape[:-2], params[0].shape[-1], sum(p.shape[-2] for p in params)
        if self.extra:
            lead = (lead[0] + 1, *lead[1:])  # the extra parameters as entry E
        om = output_major(torch.device(device), dtype)
        storage = torch.empty((*lead, n_out, n_in) if om else (*lead, n_in, n_out), dtype=dtype, device=device)
        with torch.no_grad():
            for module, name, view in self._slots(storage):
                p = getattr(module, name)
                if tuple(p.shape) != tuple(view.shape):
                    raise ValueError(f"FusedGroup: {name} has shape {list(p.shape)}, expected {list(view.shape)}")
                if copy:
                    view.copy_(p)
                if isinstance(p, nn.Parameter) and p.device == device:
                    p.data = view  # the same Parameter object: optimizers and hooks keep working
                else:
                    setattr(module, name, nn.Parameter(view, requires_grad=p.requires_grad))
        self.storage = storage
        self._weight = storage if om else storage.transpose(-1, -2)  # [..., sum O, I], read on every call
        self._ptr = storage.data_ptr()  # where members[0] starts; and extra[0], entry E:
        self._extra_ptr = getattr(*self.extra[0]).data_ptr() if self.extra else None

    def float_weight(self) -> torch.Tensor:
        """The fused weight whatever the autograd mode: for a group beside a packed one (`quant`), whose
        canonical parameters are empty."""
        if self.storage is None:
            raise RuntimeError("FusedGroup: no float storage (the group is packed)")
        return self._weight

    def weight(self) -> torch.Tensor | None:
        """The fused [..., sum O, I] weight (the storage or its transposed view), or None where it must not be used:
        autograd on, or members re-pointed elsewhere since the last refresh."""
        if torch.is_grad_enabled() or self.storage is None or self.quant is not None:
            return None
        if torch.compiler.is_compiling():
            # Pointers cannot be traced; a compiled step reads the storage the last refresh made (load
            # hooks and `.to()` refresh it) and its guards check that tensor's dtype, shape and strides.
            return self._weight
        if getattr(*self.members[0]).data_ptr() != self._ptr:
            return None
        if self.extra and getattr(*self.extra[0]).data_ptr() != self._extra_ptr:
            return None
        return self._weight


class FusedModule(nn.Module):
    """A module with fused groups; `fused_groups()` lists them."""

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FusedModule:
        super()._apply(fn, recurse)  # converts every parameter separately, leaving the storage behind
        for group in self.fused_groups():
            group.refresh()
        return self


def allocate(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Uninitialised `dtype` storage on `device` for a model built on the meta device: one block
    per fused group (its members become views), an empty tensor for every other parameter."""
    for m in model.modules():
        for group in m.fused_groups() if isinstance(m, FusedModule) else ():
            group.allocate(device, dtype)
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device=device, dtype=dtype),
                                                   requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


def refresh_fused(model: nn.Module) -> None:
    """Rebuild every group's storage in `model` (after parameters were replaced wholesale)."""
    for m in model.modules():
        if isinstance(m, FusedModule):
            for group in m.fused_groups():
                group.refresh()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for a fused weight [O, I], through the fastest CPU path for a few rows.

    float32 (weight a transposed view of contiguous [I, O] storage): a few rows (decoding) on a
    multi-core CPU are split along the inputs, one contiguous block of storage rows per thread, and
    the partial products added: on 2 cores MKL's own matrix-vector product streams a [1024, 3072]
    matrix at 21 GB/s, a [1536, 1024] one at 13; split, at 28 and 25.
    bfloat16 / float16 (weight contiguous [O, I]): up to `cpu_kernels.MAX_ROWS` rows run through the
    project's own kernel (`torch_backend.cpu_kernels`); where it is not built, one or two rows run with
    oneDNN switched off, which takes torch's native matrix-vector kernel (fp32 accumulation, as
    oneDNN's) at 2-3x the speed.
    Larger inputs (prefill) run whole, with oneDNN.
    """
    rows = x.numel() // x.shape[-1]
    if x.dtype in REDUCED and cpu_kernels.reduced_fits(x, weight):
        return cpu_kernels.reduced_gemv(x, weight)
    if x.device.type != "cpu" or rows > SPLIT_MAX_ROWS or torch.compiler.is_compiling():
        return F.linear(x, weight)
    if x.dtype in REDUCED:
        if rows > NATIVE_MAX_ROWS or not weight.is_contiguous():
            return F.linear(x, weight)
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False  # a process-wide switch, restored right after
        try:
            return F.linear(x, weight)
        finally:
            torch.backends.mkldnn.enabled = previous
    storage = weight.mT  # [I, O]
    n_in = storage.shape[0]
    parts = min(torch.get_num_threads(), n_in // SPLIT_MIN_INPUTS)
    if (parts < 2 or n_in % parts or x.dtype != torch.float32 or storage.numel() * 4 < SPLIT_MIN_BYTES
            or not storage.is_contiguous()):
        return F.linear(x, weight)
    # [rows, I] -> [parts, rows, I/parts]; one view for a single row
    xs = x.reshape(parts, 1, n_in // parts) if rows == 1 else x.reshape(rows, parts, n_in // parts).transpose(0, 1)
    partial = torch.bmm(xs, storage.view(parts, n_in // parts, -1))  # [parts, rows, O], a thread per part
    return partial.sum(0).view(*x.shape[:-1], -1)  # [rows, O] -> [..., O]
