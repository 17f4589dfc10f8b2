"""Feed-forward layers: dense SwiGLU and the Llama 4 mixture of experts (sigmoid top-k routing
that scales each expert's input, plus an always-on shared expert).

Shapes: N token slots (tokens x top_k), T tokens, D model dim, F hidden dim, E experts, k top_k.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.args import ModelArgs
from torch_backend import cpu_kernels
from torch_backend.fused import FusedGroup, FusedModule, linear
from torch_backend.qweight import entry

# Up to this many token slots (decode) each slot reads its own expert's weights directly; larger
# inputs are sorted by expert and run expert by expert.
GATHER_MAX_SLOTS = 4
# Where grouped products are not available, accelerators gather up to this many slots' weights
# (a decode step of up to 16 rows of top-4), so decoding never waits on the host.
GATHER_MAX_SLOTS_ACCELERATOR = 64
# Float32 prefills on the CPU with up to this many slots per expert on average run the project's expert
# products (`Experts._float_runs`); past that (long prompts) the GEMM library is as fast.
FLOAT_RUN_ROWS = 16


def swiglu(gate_value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value of a fused [..., 2F] gate|value product -> [..., F]."""
    gate, value = gate_value.chunk(2, dim=-1)  # each [..., F]
    return F.silu(gate) * value


def swiglu_product(x: torch.Tensor, gate_value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert from fused weights: gate|value [2F, D] and w_out [D, F]; x [.., D] -> [.., D]."""
    return linear(swiglu(linear(x, gate_value)), out)  # [.., 2F] -> [.., F] -> [.., D]


def packed_swiglu(x: torch.Tensor, gate_value: FusedGroup, out: FusedGroup,
                  e: int | torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU where one group or both are packed (`FusedGroup.quant`); `e`: the entry of stacked groups
    (an int, or a one-element id tensor on the device, whose entry is copied out without a host read)."""
    def product(group: FusedGroup, h: torch.Tensor) -> torch.Tensor:
        if group.quant is not None:
            return group.quant.mm(h, e)
        return linear(h, entry(group.float_weight(), e))

    return product(out, swiglu(product(gate_value, x)))


class FeedForward(FusedModule):
    """SwiGLU: w_out(silu(w_gate(x)) * w_value(x)). `fused=False` leaves the storage to an owner
    (the MoE keeps its shared expert beside the routed experts)."""

    def __init__(self, dim: int, hidden_dim: int, fused: bool = True) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_value = nn.Linear(dim, hidden_dim, bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)
        self._groups = (FusedGroup([(self.w_gate, "weight"), (self.w_value, "weight")]),
                        FusedGroup([(self.w_out, "weight")])) if fused else ()

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return self._groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._groups and any(g.quant is not None for g in self._groups):
            return packed_swiglu(x, *self._groups)
        gv, out = (g.weight() for g in self._groups) if self._groups else (None, None)
        if gv is None or out is None:
            return self.w_out(F.silu(self.w_gate(x)) * self.w_value(x))
        return swiglu_product(x, gv, out)


def grouped_fits(x: torch.Tensor, gv: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands: autograd off, one dtype, every row of x and of
    the weights a multiple of 16 bytes long (its alignment rule), and a probe of the same device, dtype
    and weight layout ran (its kernels cover bfloat16 on recent GPUs and the CPU, not everything)."""
    if torch.is_grad_enabled() or not (x.dtype == gv.dtype == out.dtype):
        return False
    size = x.element_size()
    if any(n * size % 16 for n in (gv.shape[-1], gv.shape[-2], out.shape[-2])):
        return False
    return _grouped_mm_runs(x.device, x.dtype, gv.mT.stride(-1) == 1, out.mT.stride(-1) == 1)


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype, *row_major: bool) -> bool:
    """One tiny grouped product per weight layout (row-major [E, in, out] or its transpose), once per
    process: the first MoE call is a prefill, outside any CUDA graph capture. On CUDA the product must
    also capture into a graph, as decode steps do (torch 2.11's float32 fallback reads the offsets on
    the host, which a capture refuses)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        for rows in row_major:
            w = torch.zeros((2, 16, 16), dtype=dtype, device=device)
            x = torch.zeros((4, 16), dtype=dtype, device=device)
            offs = torch.tensor([2, 4], dtype=torch.int32, device=device)
            torch._grouped_mm(x, w if rows else w.mT, offs=offs)
            if device.type == "cuda":
                with warnings.catch_warnings():  # a refused capture also warns that its graph is empty
                    warnings.simplefilter("ignore")
                    with torch.cuda.graph(torch.cuda.CUDAGraph()):
                        torch._grouped_mm(x, w if rows else w.mT, offs=offs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, gate_value: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """x [N, D], experts [N], weights gate|value [E, 2F, D] and w_out [E, D, F] -> [N, D].

    Slots sorted by expert, then one grouped product per projection (each expert's rows against its
    weights, read once): no per-expert loop and no host reads, on every device. Measured on a 2-core
    CPU (16 experts, D 512, F 768): 512 slots in 6.6 ms against 7.0 for a loop over the experts, 8
    slots in 0.72 ms against 2.9 for products over gathered weights.
    """
    order = torch.argsort(experts, stable=True)  # [N]: slots grouped by expert
    # Counts by index_add (bincount sizes its output from the data, a host read on accelerators).
    counts = torch.zeros(gate_value.shape[0], dtype=torch.int32, device=x.device)
    counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] one past each expert's last slot
    h = swiglu(torch._grouped_mm(x[order], gate_value.mT, offs=ends))  # [N, 2F] -> [N, F]
    y = torch._grouped_mm(h, out.mT, offs=ends)  # [N, D] in expert order
    return torch.empty_like(y).index_copy_(0, order, y)  # rows back in slot order


def _runs(experts: torch.Tensor, entries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order that groups slots by expert [N] and each of `entries` stack entries' count of slots (int64,
    by index_add: fixed length whatever the ids), as the CPU kernels' runs of rows take them."""
    order = torch.argsort(experts, stable=True)  # [N], slots grouped by expert
    return order, torch.zeros(entries, dtype=torch.long).index_add_(0, experts, torch.ones_like(experts))


def _expert_id(e: torch.Tensor, num_experts: int) -> int:
    """A one-element id tensor as an int; while compiling, a symbolic one (no recompile per expert)."""
    i = e.item()
    if torch.compiler.is_compiling():
        torch._check(i >= 0)
        torch._check(i < num_experts)
    return i


class Experts(nn.Module):
    """E SwiGLU experts stored as [E, out, in] tensors; only the selected experts are read.

    Fused (storage owned by the MoE, with the shared expert as entry E), each expert's gate|value is
    one contiguous matrix and its w_out another (input-major [D, 2F] and [F, D] as transformers
    stores them, or [2F, D] and [D, F] for bfloat16/float16 on the CPU, see `torch_backend.fused`),
    so one expert is two plain products over contiguous memory.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts  # the stacks' own shapes are empty where they are packed
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_value = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.storage: tuple[FusedGroup, FusedGroup] | None = None  # gate|value and w_out, set by the owner

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Fused gate|value [E+1, 2F, D] and w_out [E+1, D, F] weights, or Nones (autograd on, no owner)."""
        if self.storage is None:
            return None, None
        gv, out = (g.weight() for g in self.storage)
        return (gv, out) if gv is not None and out is not None else (None, None)

    def _expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """Expert `e` (an int, or ids [N] to gather per row of x [N, 1, D]) on x [.., D] -> [.., D];
        fused, e = E is the shared expert."""
        gv, out = self._fused()
        if gv is None or out is None:  # autograd on: the canonical parameters, one by one
            return (F.silu(x @ self.w_gate[e].mT) * (x @ self.w_value[e].mT)) @ self.w_out[e].mT
        if isinstance(e, int | torch.SymInt):  # views of one expert's block of the fused storage: no copies
            return swiglu_product(x, gv[e], out[e])
        return swiglu(x @ gv.mT[e]) @ out.mT[e]  # gathered copies [N, D, 2F] and [N, F, D]

    def with_shared(self, routed: torch.Tensor, e: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Expert e (an int or a one-element tensor) on routed [1, D] plus the shared expert on x [1, D],
        or None where this path does not apply (only float32 input-major CPU storage).

        Entries e and E of the storage are one strided view (step E - e), so both experts run as
        two batched products (one thread each) instead of four: on a 2-core CPU a 16-expert layer
        of the small benchmark model took 470 us against 590 us.
        """
        if self.storage is None or x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
            return None
        gv, out = (g.storage for g in self.storage)  # [E+1, D, 2F], [E+1, F, D]
        if gv is None or gv.dtype != torch.float32 or gv.device.type != "cpu" or self._fused()[0] is None:
            return None
        E, e = gv.shape[0] - 1, int(e)  # the id read only here: on the CPU, where it costs nothing
        xs = torch.stack([routed, x])  # [2, 1, D]
        h = swiglu(torch.bmm(xs, gv[e :: E - e]))  # entries e and E: [2, 1, 2F] -> [2, 1, F]
        return torch.bmm(h, out[e :: E - e]).sum(0)  # [2, 1, D] -> [1, D]

    def packed_with_shared(self, routed: torch.Tensor, experts: torch.Tensor,
                           x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The routed slots (routed [N, D], experts [N]) and the shared expert on x [T, D] -> [N, D] and
        [T, D], each of the two products one kernel call over all N + T rows, or None where the CPU
        kernels do not hold both packed groups. Up to GATHER_MAX_SLOTS slots (decoding) each row is its
        own product (`cpu_kernels.expert_gemv`); more (prefill) run sorted by expert, one run of rows per
        expert (`cpu_kernels.expert_mm`). Measured on a 2-core x86 CPU, 4 bits: two [512, 768] products
        30 us as two calls, 20 as one; the small model's 128-token prefill 60.4 -> 49.6 ms against a
        call per expert and product."""
        gv, out = (g.quant for g in self.storage) if self.storage is not None else (None, None)
        if (gv is None or out is None or gv.layout != "native" or out.layout != "native" or gv.packed.dim() != 3
                or x.device.type != "cpu"):
            return None
        n, experts = routed.shape[0], experts.reshape(-1)
        if n <= GATHER_MAX_SLOTS:
            ids = torch.cat([experts, experts.new_full((x.shape[0],), self.num_experts)])  # [N + T]
            rows = torch.cat([routed, x])  # [N + T, D]: entry E of each stack is the shared expert
            h = swiglu(cpu_kernels.expert_gemv(rows, gv.packed, gv.scales, ids, gv.bits, gv.group_size))  # [N + T, F]
            y = cpu_kernels.expert_gemv(h, out.packed, out.scales, ids, out.bits, out.group_size)  # [N + T, D]
            return y[:n], y[n:]
        order, counts = _runs(experts, self.num_experts + 1)
        # The shared expert (entry E) takes every token, after the slots; past QUANT_MAX_ROWS tokens it runs
        # on its own, where the GEMM on the dequantized weight is faster (`cpu_kernels.quant_mm`; the small
        # model's 128-token prefill, 4 bits: 40.2 -> 38.9 ms, 8 bits: 44.5 -> 43.4).
        apart = x.shape[0] > cpu_kernels.QUANT_MAX_ROWS
        counts[-1] = 0 if apart else x.shape[0]  # [E + 1]
        rows = routed[order] if apart else torch.cat([routed[order], x])  # [N (+ T), D]
        h = swiglu(cpu_kernels.expert_mm(rows, gv.packed, gv.scales, counts, gv.bits, gv.group_size))  # [N (+ T), F]
        y = cpu_kernels.expert_mm(h, out.packed, out.scales, counts, out.bits, out.group_size)  # [N (+ T), D]
        shared = self.quantized_expert(x, self.num_experts) if apart else y[n:]
        return torch.empty_like(y[:n]).index_copy_(0, order, y[:n]), shared  # slots back in their order

    def _float_runs(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor | None:
        """A prefill's slots (x [N, D], experts [N]) on float32 experts on the CPU -> [N, D]: sorted by expert,
        each of the two products one `cpu_kernels.expert_mm_float` call over every expert's run of rows, which
        streams each expert's weight once where a GEMM library reads it at a fraction of the memory's speed.
        Measured on a 2-core x86 CPU, the small model's 128-token float32 prefill: 50-51 ms against 68-73 through
        `torch._grouped_mm` (both timed alternately in one process). None where it does not apply: other
        storage, or more than FLOAT_RUN_ROWS slots per expert on average (a long prompt: the GEMM library is
        as fast there)."""
        gv, out = (g.storage for g in self.storage) if self.storage is not None else (None, None)
        if (gv is None or out is None or experts.numel() > FLOAT_RUN_ROWS * self.num_experts
                or not cpu_kernels.expert_float_fits(x, gv) or out.dtype != torch.float32
                or not out.is_contiguous() or out.shape[1] * 2 != gv.shape[2]):
            return None  # input-major storage: gate|value [E+1, D, 2F], output [E+1, F, D]
        order, counts = _runs(experts, self.num_experts)
        h = swiglu(cpu_kernels.expert_mm_float(x[order], gv, counts))  # [N, 2F] -> [N, F]
        y = cpu_kernels.expert_mm_float(h, out, counts)  # [N, D] in expert order
        return torch.empty_like(y).index_copy_(0, order, y)  # rows back in slot order

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D] (already scaled by the routing score), experts [N] -> [N, D]."""
        if self.packed:
            return self._quantized(x, experts)
        gv, out = self._fused()
        few_on_cpu = x.device.type == "cpu" and experts.numel() <= GATHER_MAX_SLOTS  # decoding on the CPU
        if gv is not None and out is not None and not few_on_cpu:
            runs = self._float_runs(x, experts)
            if runs is not None:
                return runs
            if grouped_fits(x, gv, out):
                return grouped_experts(x, experts, gv[:-1], out[:-1])  # entries 0 .. E-1 (E is the shared expert)
        if x.device.type != "cpu" and experts.numel() <= GATHER_MAX_SLOTS_ACCELERATOR:
            # Decoding on accelerators: gather the slots' experts instead of synchronising on the ids.
            return self._expert(x[:, None, :], experts)[:, 0, :].to(x.dtype)  # [N, 1, D] -> [N, D]
        if experts.numel() > GATHER_MAX_SLOTS or x.device.type != "cpu":
            return self._sorted(x, experts)  # a prefill where grouped products are missing: a loop over experts
        # On the CPU reading the ids costs nothing, and each slot reads its expert's weights in place.
        ids = ([_expert_id(experts[i], self.num_experts) for i in range(experts.numel())]
               if torch.compiler.is_compiling() else experts.tolist())
        rows = [self._expert(x[i : i + 1], e) for i, e in enumerate(ids)]  # [1, D] each
        return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(x.dtype)

    @property
    def packed(self) -> bool:
        """Whether the storage holds packed (quantized) weights, `torch_backend.quantize.keep_packed`."""
        return self.storage is not None and any(g.quant is not None for g in self.storage)

    def quantized_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e (E: the shared one) from the packed storage, on x [.., D] -> [.., D]."""
        return packed_swiglu(x, *self.storage, e=e)

    def _quantized(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each slot through its expert's packed kernels: decoding on accelerators with the expert's packed
        entry copied out by its id on the device (no host read, so a CUDA graph captures the step), else
        (the CPU, where reading the ids costs nothing, and prefills) by ids read on the host."""
        if x.device.type != "cpu" and experts.numel() <= GATHER_MAX_SLOTS_ACCELERATOR:
            rows = [packed_swiglu(x[i : i + 1], *self.storage, e=experts[i : i + 1]) for i in range(experts.numel())]
            return rows[0] if len(rows) == 1 else torch.cat(rows)  # [1, D] each -> [N, D]
        if experts.numel() == 1:
            return self.quantized_expert(x, _expert_id(experts, self.num_experts))
        return self._sorted(x, experts, self.quantized_expert)

    def _sorted(self, x: torch.Tensor, experts: torch.Tensor,
                expert: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
        """Slots grouped by expert, one product per expert that has any (`expert`: default `_expert`)."""
        expert = expert or self._expert
        order = torch.argsort(experts, stable=True)  # [N], slots grouped by expert
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        xs = x[order]  # [N, D] in expert order
        ys = torch.empty_like(x)  # [N, D]; every row is written exactly once below
        start = 0
        for e, n in enumerate(counts):
            if n:
                # .to(): a no-op outside autocast, where the products come back in bfloat16
                ys[start : start + n] = expert(xs[start : start + n], e).to(ys.dtype)
                start += n
        return torch.empty_like(x).index_copy_(0, order, ys)  # rows back in slot order


class MoE(FusedModule):
    """Routed experts plus a shared expert; fused, the shared expert is entry E of the experts' storage."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.moe_args is None:
            raise ValueError("MoE: ModelArgs.moe_args is required for an MoE layer")
        D, F_, E = args.dim, args.moe_hidden_dim, args.moe_args.num_experts
        self.top_k = args.moe_args.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, F_)
        self.shared_expert = FeedForward(D, F_, fused=False)
        ex, sh = self.experts, self.shared_expert
        # Owned here, so .to() rebuilds them after both children converted their parameters.
        gate_value = FusedGroup([(ex, "w_gate"), (ex, "w_value")],
                                extra=[(sh.w_gate, "weight"), (sh.w_value, "weight")])
        # The router stays in float (dequantized where a folder quantized it): it picks the experts.
        self._groups = (FusedGroup([(self.router, "weight")], packable=False), gate_value,
                        FusedGroup([(ex, "w_out")], extra=[(sh.w_out, "weight")]))
        ex.storage = self._groups[1:]

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return self._groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        k = self.top_k
        w = self._groups[0].weight()
        if w is not None and cpu_kernels.router_fits(x, w):  # decoding on the CPU: product and top-k in one call
            picked, experts = cpu_kernels.router_topk(x, w, k)  # each [T, k]
        else:
            logits = self.router(x) if w is None else linear(x, w)  # [T, E], model dtype
            picked, experts = torch.topk(logits, k, dim=-1)  # each [T, k]
        scores = torch.sigmoid(picked.float()).to(x.dtype)  # no softmax, no renormalising
        # input scaled by its score: [T, D] * [T, 1], or [T, 1, D] * [T, k, 1] -> [T*k, D]
        routed = x * scores if k == 1 else (x[:, None, :] * scores[..., None]).reshape(-1, shape[-1])
        if routed.shape[0] == 1 and not self.experts.packed:  # one token, top-1: expert and shared together
            both = self.experts.with_shared(routed, experts, x)
            if both is not None:
                return both.reshape(shape)
        together = self.experts.packed_with_shared(routed, experts, x) if self.experts.packed else None
        y, shared = together if together is not None else (self.experts(routed, experts.reshape(-1)), None)  # [T*k, D]
        if k > 1:
            y = y.view(-1, k, shape[-1]).sum(dim=1)  # [T*k, D] -> [T, k, D] -> [T, D]
        return ((self._shared(x) if shared is None else shared) + y).reshape(shape)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        if self.experts.packed:
            return self.experts.quantized_expert(x, self.experts.num_experts)  # entry E
        gv, out = self._groups[1].weight(), self._groups[2].weight()
        if gv is None or out is None:
            return self.shared_expert(x)
        return swiglu_product(x, gv[-1], out[-1])  # entry E of the fused storage
