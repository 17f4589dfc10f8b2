"""Feed-forward layers: dense SwiGLU and the Llama 4 mixture of experts (sigmoid top-k routing
that scales each expert's input, plus an always-on shared expert).

Shapes: N token slots (tokens x top_k), T tokens, D model dim, F hidden dim, E experts, k top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.args import ModelArgs
from torch_backend.fused import FusedGroup, FusedModule, linear

# Up to this many token slots (decode) each slot reads its own expert's weights directly; larger
# inputs are sorted by expert and run expert by expert.
GATHER_MAX_SLOTS = 4


def swiglu(gate_value: torch.Tensor) -> torch.Tensor:
    """silu(gate) * value of a fused [..., 2F] gate|value product -> [..., F]."""
    gate, value = gate_value.chunk(2, dim=-1)  # each [..., F]
    return F.silu(gate) * value


class FeedForward(FusedModule):
    """SwiGLU: w_out(silu(w_gate(x)) * w_value(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_value = nn.Linear(dim, hidden_dim, bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)
        self._gate_value = FusedGroup([(self.w_gate, "weight"), (self.w_value, "weight")])
        self._out = FusedGroup([(self.w_out, "weight")])

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return self._gate_value, self._out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gv, out = self._gate_value.weight(), self._out.weight()
        if gv is None or out is None:
            return self.w_out(F.silu(self.w_gate(x)) * self.w_value(x))
        return linear(swiglu(linear(x, gv)), out)  # [.., 2F] -> [.., F] -> [.., D]


class Experts(FusedModule):
    """E SwiGLU experts stored as [E, out, in] tensors; only the selected experts are read.

    Fused, each expert's gate|value is one contiguous matrix and its w_out another (input-major
    [D, 2F] and [F, D] as transformers stores them, or [2F, D] and [D, F] for bfloat16/float16 on
    the CPU, see `torch_backend.fused`), so one expert is two plain products over contiguous memory.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_value = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self._gate_value = FusedGroup([(self, "w_gate"), (self, "w_value")])
        self._out = FusedGroup([(self, "w_out")])

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return self._gate_value, self._out

    def _expert(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        """Expert `e` (an int, or ids [N] to gather per row of x [N, 1, D]) on x [.., D] -> [.., D]."""
        gv, out = self._gate_value.weight(), self._out.weight()
        if gv is None or out is None:  # autograd on: the canonical parameters, one by one
            return (F.silu(x @ self.w_gate[e].mT) * (x @ self.w_value[e].mT)) @ self.w_out[e].mT
        if isinstance(e, int):  # views of one expert's block of the fused storage: no copies
            return linear(swiglu(linear(x, gv[e])), out[e])
        return swiglu(x @ gv.mT[e]) @ out.mT[e]  # gathered copies [N, D, 2F] and [N, F, D]

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D] (already scaled by the routing score), experts [N] -> [N, D]."""
        if experts.numel() > GATHER_MAX_SLOTS:
            return self._sorted(x, experts)
        if x.device.type == "cpu":
            # On the CPU reading the ids costs nothing, and each slot reads its expert's weights in place.
            rows = [self._expert(x[i : i + 1], e) for i, e in enumerate(experts.tolist())]  # [1, D] each
            return (rows[0] if len(rows) == 1 else torch.cat(rows)).to(x.dtype)
        # On accelerators, gather the slots' experts instead of synchronising on the ids.
        return self._expert(x[:, None, :], experts)[:, 0, :].to(x.dtype)  # [N, 1, D] -> [N, D]

    def _sorted(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(experts, stable=True)  # [N], slots grouped by expert
        counts = torch.bincount(experts, minlength=self.w_gate.shape[0]).tolist()
        xs = x[order]  # [N, D] in expert order
        ys = torch.empty_like(x)  # [N, D]; every row is written exactly once below
        start = 0
        for e, n in enumerate(counts):
            if n:
                # .to(): a no-op outside autocast, where the products come back in bfloat16
                ys[start : start + n] = self._expert(xs[start : start + n], e).to(ys.dtype)
                start += n
        return torch.empty_like(x).index_copy_(0, order, ys)  # rows back in slot order


class MoE(FusedModule):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.moe_args is None:
            raise ValueError("MoE: ModelArgs.moe_args is required for an MoE layer")
        D, F_, E = args.dim, args.moe_hidden_dim, args.moe_args.num_experts
        self.top_k = args.moe_args.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, F_)
        self.shared_expert = FeedForward(D, F_)
        self._router = FusedGroup([(self.router, "weight")])

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return (self._router,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        k = self.top_k
        w = self._router.weight()
        logits = self.router(x) if w is None else linear(x, w)  # [T, E], model dtype
        picked, experts = torch.topk(logits, k, dim=-1)  # each [T, k]
        scores = torch.sigmoid(picked.float()).to(x.dtype)  # no softmax, no renormalising
        routed = (x[:, None, :] * scores[..., None]).reshape(-1, shape[-1])  # input scaled: [T*k, D]
        y = self.experts(routed, experts.reshape(-1))  # [T*k, D]
        if k > 1:
            y = y.view(-1, k, shape[-1]).sum(dim=1)  # [T*k, D] -> [T, k, D] -> [T, D]
        return (self.shared_expert(x) + y).reshape(shape)
