"""Llama 4 attention: GQA with interleaved RoPE and QK norm (RoPE layers) or temperature-tuned
global attention (NoPE layers).

Shapes: B batch, L query length, S key length, H query heads, K kv heads, d head dim, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.args import LayerRole, ModelArgs
from common.rope import attention_mask, rope_cos_sin, rope_inv_freqs, temperature_scales
from torch_backend.cache import ChunkedKVCache, KVCache
from torch_backend.device import to_device_mask


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, computed in float32 and cast back to x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RotaryTable:
    """cos/sin of interleaved-pair RoPE for a range of absolute positions, float32 on a device.

    A plain object rather than a buffer, so `model.to(dtype)` never rounds the frequencies.
    """

    def __init__(self, args: ModelArgs) -> None:
        self.inv_freqs = rope_inv_freqs(args.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, position: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(self.inv_freqs, position, length)  # each [L, d/2]
        return torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x [B, L, heads, d] by position; fp32 math."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, d/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # each [B, L, heads, d/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [L, 1, d/2], broadcast over B and heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, L, heads, d/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, L, heads, d]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, role: LayerRole) -> None:
        super().__init__()
        D, d = args.dim, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, d
        self.role = role
        self.norm_eps = args.norm_eps
        self.chunk = args.attention_chunk_size if role.chunked else None
        self.floor_scale, self.attn_scale = args.floor_scale, args.attn_scale
        self.wq = nn.Linear(D, args.n_heads * d, bias=False)
        self.wk = nn.Linear(D, args.n_kv_heads * d, bias=False)
        self.wv = nn.Linear(D, args.n_kv_heads * d, bias=False)
        self.wo = nn.Linear(args.n_heads * d, D, bias=False)

    def _project(self, x: torch.Tensor, position: int,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.n_heads, -1)  # [B, L, H, d]
        k = self.wk(x).view(B, L, self.n_kv_heads, -1)  # [B, L, K, d]
        v = self.wv(x).view(B, L, self.n_kv_heads, -1)  # [B, L, K, d]
        if self.role.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.role.qk_norm:
            q, k = rms_norm(q, self.norm_eps), rms_norm(k, self.norm_eps)
        if self.role.temperature_tuning:
            scales = temperature_scales(position, L, self.floor_scale, self.attn_scale)
            scales = torch.from_numpy(scales).to(x.device)[:, None, None]  # [L, 1, 1] over [B, L, H, d]
            # Scaled in float32 and cast back, as HF does (Meta's reference promotes q instead).
            q = (q * scales).to(x.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, L, d]

    def forward(self, x: torch.Tensor, position: int, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | ChunkedKVCache | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self._project(x, position, rope)
        k_start = position
        if cache is not None:
            k, v, k_start = cache.update_and_fetch(k, v)  # [B, K, S, d]
        mask = None
        if L > 1:
            mask = to_device_mask(attention_mask(position, L, k_start, k.shape[2], self.chunk), x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # [B, H, L, d]
        return self.wo(out.transpose(1, 2).reshape(B, L, -1))  # [B, H, L, d] -> [B, L, H*d]

