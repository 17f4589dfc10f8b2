"""Llama 4 attention: GQA with interleaved RoPE and QK norm (RoPE layers) or temperature-tuned
global attention (NoPE layers).

Shapes: B batch, L query length, S key length, H query heads, K kv heads, d head dim, D model dim.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from common.args import LayerRole, ModelArgs
from common.rope import attention_mask, rope_inv_freqs, temperature_scales
from mlx_llm.cache import ChunkedKVCache, KVCache


def rms_norm(x: mx.array, eps: float) -> mx.array:
    """x / rms(x) over the last axis, computed in float32 and cast back to x's dtype."""
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


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
        # mx.fast.rope's `freqs` are periods (1 / inverse frequency); the leading underscore keeps
        # this float32 table out of the parameters.
        self._rope_periods = mx.array(1.0 / rope_inv_freqs(d, args.rope_theta, args.rope_scaling))

    def _rope(self, x: mx.array, position: int) -> mx.array:
        # Rotated in float32 and cast back, as the reference does; bf16 rope rounds differently.
        y = mx.fast.rope(x.astype(mx.float32), self.head_dim, traditional=True, base=None, scale=1.0,
                         offset=position, freqs=self._rope_periods)
        return y.astype(x.dtype)

    def _project(self, x: mx.array, position: int) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        q = self.wq(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # [B, H, L, d]
        k = self.wk(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, K, L, d]
        v = self.wv(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # [B, K, L, d]
        if self.role.use_rope:
            q, k = self._rope(q, position), self._rope(k, position)
        if self.role.qk_norm:
            q, k = rms_norm(q, self.norm_eps), rms_norm(k, self.norm_eps)
        if self.role.temperature_tuning:
            scales = temperature_scales(position, L, self.floor_scale, self.attn_scale)
            # Scaled in float32 and cast back, as HF does (Meta's reference promotes q instead).
            q = (q * mx.array(scales)[:, None]).astype(q.dtype)  # scales [L, 1] over [B, H, L, d]
        return q, k, v

    def _mask(self, position: int, L: int, k_start: int, S: int) -> mx.array | str | None:
        """None for one query; "causal" when all keys and queries share a chunk; else [L, S] bool."""
        if L == 1:
            return None
        # Keys always end at the last query, so mlx's lower-right "causal" is exact and builds no mask.
        if self.chunk is None or k_start // self.chunk == (position + L - 1) // self.chunk:
            return "causal"
        return mx.array(attention_mask(position, L, k_start, S, self.chunk))  # [L, S] bool

    def __call__(self, x: mx.array, position: int, cache: KVCache | ChunkedKVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self._project(x, position)
        k_start = position
        if cache is not None:
            k, v, k_start = cache.update_and_fetch(k, v)  # [B, K, S, d]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5,
                                                   mask=self._mask(position, L, k_start, k.shape[2]))
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # [B, H, L, d] -> [B, L, H*d]
