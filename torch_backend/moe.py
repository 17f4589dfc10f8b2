"""Feed-forward layers: dense SwiGLU and the Llama 4 mixture of experts (sigmoid top-k routing
that scales each expert's input, plus an always-on shared expert).

Shapes: N token slots (tokens x top_k), T tokens, D model dim, F hidden dim, E experts, k top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.args import ModelArgs

# Up to this many token slots (decode) each slot gathers its expert's weights; the gathered copy
# costs 3*F*D per slot, so larger inputs are sorted by expert and run expert by expert instead.
GATHER_MAX_SLOTS = 4


class FeedForward(nn.Module):
    """SwiGLU: w_out(silu(w_gate(x)) * w_value(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.w_value = nn.Linear(dim, hidden_dim, bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_value(x))


def _per_slot_matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w, x[:, :, None])[:, :, 0]  # [N, out, in] @ [N, in, 1] -> [N, out]


class Experts(nn.Module):
    """E SwiGLU experts stored as [E, out, in] tensors; only the selected experts are read."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_value = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D] (already scaled by the routing score), experts [N] -> [N, D]."""
        if experts.numel() <= GATHER_MAX_SLOTS:
            return self._gathered(x, experts)
        return self._sorted(x, experts)

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        gate = _per_slot_matvec(self.w_gate[experts], x)  # w_gate[experts]: [N, F, D] -> [N, F]
        h = F.silu(gate) * _per_slot_matvec(self.w_value[experts], x)  # [N, F]
        return _per_slot_matvec(self.w_out[experts], h)  # [N, D, F] @ [N, F] -> [N, D]

    def _sorted(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(experts, stable=True)  # [N], slots grouped by expert
        counts = torch.bincount(experts, minlength=self.w_gate.shape[0]).tolist()
        out = torch.empty_like(x)  # [N, D]; every slot is written exactly once below
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]  # [n] slots routed to expert e
            xe = x[rows]  # [n, D]
            h = F.silu(xe @ self.w_gate[e].T) * (xe @ self.w_value[e].T)  # [n, F]
            out[rows] = (h @ self.w_out[e].T).to(out.dtype)  # [n, D]; a no-op outside autocast
            start += n
        return out


class MoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.moe_args is None:
            raise ValueError("MoE: ModelArgs.moe_args is required for an MoE layer")
        D, F_, E = args.dim, args.moe_hidden_dim, args.moe_args.num_experts
        self.top_k = args.moe_args.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, F_)
        self.shared_expert = FeedForward(D, F_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        k = self.top_k
        logits = self.router(x)  # [T, E], model dtype
        picked, experts = torch.topk(logits, k, dim=-1)  # each [T, k]
        scores = torch.sigmoid(picked.float()).to(x.dtype)  # no softmax, no renormalising
        routed = (x[:, None, :] * scores[..., None]).reshape(-1, shape[-1])  # input scaled: [T*k, D]
        y = self.experts(routed, experts.reshape(-1)).view(-1, k, shape[-1])  # [T*k, D] -> [T, k, D]
        return (self.shared_expert(x) + y.sum(dim=1)).reshape(shape)
