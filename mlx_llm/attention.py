"""Llama 4 attention: GQA with interleaved RoPE and QK norm (RoPE layers) or temperature-tuned
global attention (NoPE layers).

Shapes: B batch, L query length, S key length, H query heads, K kv heads, d head dim, D model dim.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from common.args import LayerRole, ModelArgs
from common.rope import attention_mask, rope_inv_freqs, temperature_scales, temperature_scales_at
from common.spans import RowSpans
from mlx_llm.cache import ChunkedKVCache, KVCache
from mlx_llm.fused import FusedRows
from mlx_llm.parallel import linear


def rms_norm(x: mx.array, eps: float) -> mx.array:
    """x / rms(x) over the last axis, computed in float32 and cast back to x's dtype."""
    return mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(x.dtype)


class Positions:
    """What every layer of one forward shares: its rows' spans and NoPE query scales. Uniform forwards
    (one start, no padding) keep host-side starts; others carry per-row positions `q_pos` [B, L]."""

    def __init__(self, args: ModelArgs, spans: RowSpans) -> None:
        self.spans, self.uniform = spans, spans.uniform
        self.start, self.length = spans.start, spans.width
        tuning = any(r.temperature_tuning for r in args.layer_roles)
        self.temps = None
        if self.uniform:
            self.rope_offset: int | mx.array = self.start
            if tuning:  # [L] -> [L, 1] over [B, H, L, d]
                scales = temperature_scales(self.start, self.length, args.floor_scale, args.attn_scale)
                self.temps = mx.array(scales)[:, None]
        else:
            positions = spans.positions()  # [B, L]
            self.q_pos = mx.array(positions)
            self.rope_offset = mx.array(spans.starts)  # [B]: mx.fast.rope takes one offset per row
            self.last_at = mx.array(spans.lengths - 1)  # [B] index of each row's last token
            if tuning:  # [B, L] -> [B, 1, L, 1] over [B, H, L, d]
                scales = temperature_scales_at(positions, args.floor_scale, args.attn_scale)
                self.temps = mx.array(scales)[:, None, :, None]

    def last(self, x: mx.array, axis: int = 1) -> mx.array:
        """Each row's last real position along `axis` (1 or 2) of x, kept as a length-1 axis."""
        if self.uniform:
            return x[:, -1:] if axis == 1 else x[:, :, -1:]
        rows = mx.arange(x.shape[0])
        if axis == 1:
            return x[rows, self.last_at][:, None]  # [B, ...] -> [B, 1, ...]
        return x[rows, :, self.last_at][:, :, None]  # [B, H, ...] -> [B, H, 1, ...]


def row_mask(q_pos: mx.array, k_pos: mx.array, chunk: int | None) -> mx.array:
    """Bool [B, Lq, S] from query positions [B, Lq] and key positions [B or 1, S]: causal, and within
    the query's chunk for chunked layers (empty slots sit at EMPTY, after every query)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = k <= q
    if chunk is not None:
        allowed = allowed & ((k // chunk) == (q // chunk))
    return allowed


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, role: LayerRole) -> None:
        super().__init__()
        D, d = args.dim, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, d
        self.role = role
        self.norm_eps = args.norm_eps
        self.chunk = args.attention_chunk_size if role.chunked else None
        self.wq = nn.Linear(D, args.n_heads * d, bias=False)
        self.wk = nn.Linear(D, args.n_kv_heads * d, bias=False)
        self.wv = nn.Linear(D, args.n_kv_heads * d, bias=False)
        self.wo = nn.Linear(args.n_heads * d, D, bias=False)
        self._qkv = FusedRows(self, ("wq", "wk", "wv"))
        # mx.fast.rope's `freqs` are periods (1 / inverse frequency); the leading underscore keeps
        # this float32 table out of the parameters.
        self._rope_periods = mx.array(1.0 / rope_inv_freqs(d, args.rope_theta, args.rope_scaling))

    def fuse(self) -> None:
        """Store wq|wk|wv as one matrix (the parameters become views of it): one product per call."""
        self._qkv.fuse()

    def _rope(self, x: mx.array, position: int | mx.array) -> mx.array:
        # Rotated in float32 and cast back, as the reference does; bf16 rope rounds differently.
        y = mx.fast.rope(x.astype(mx.float32), self.head_dim, traditional=True, base=None, scale=1.0,
                         offset=position, freqs=self._rope_periods)
        return y.astype(x.dtype)

    def _qkv_heads(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """q|k heads [B, H+K, L, d] and v heads [B, K, L, d]."""
        B, L, _ = x.shape
        H, K = self.n_heads, self.n_kv_heads
        qkv = self._qkv(x)  # [B, L, (H+2K)*d], one product when fused
        qkv = qkv.reshape(B, L, H + 2 * K, -1).transpose(0, 2, 1, 3)  # [B, H+2K, L, d]
        return qkv[:, : H + K], qkv[:, H + K :]

    def _project(self, x: mx.array, pos: Positions) -> tuple[mx.array, mx.array, mx.array]:
        """q [B, H, L, d], k and v [B, K, L, d]; q and k rotated and normed together."""
        qk, v = self._qkv_heads(x)
        if self.role.use_rope:
            qk = self._rope(qk, pos.rope_offset)
        if self.role.qk_norm:
            qk = rms_norm(qk, self.norm_eps)
        q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        if self.role.temperature_tuning:
            # Scaled in float32 and cast back, as HF does (Meta's reference promotes q instead).
            q = (q * pos.temps).astype(q.dtype)  # temps [L, 1] or [B, 1, L, 1] over [B, H, L, d]
        return q, k, v

    def _mask(self, position: int, L: int, k_start: int, S: int) -> mx.array | str | None:
        """None or "causal" when all keys and queries share a chunk (keys always end at the last
        query, so mlx's lower-right "causal" is exact and builds no mask); else [L, S] bool."""
        if self.chunk is None or k_start // self.chunk == (position + L - 1) // self.chunk:
            return None if L == 1 else "causal"
        return mx.array(attention_mask(position, L, k_start, S, self.chunk))  # [L, S] bool

    def __call__(self, x: mx.array, pos: Positions, cache: KVCache | ChunkedKVCache | None = None,
                 last_only: bool = False) -> mx.array:
        """[B, L, D] -> [B, L, D]; with `last_only`, keys and values of every position still reach
        the cache but only each row's last position attends: [B, 1, D]."""
        B = x.shape[0]
        q, k, v = self._project(x, pos)
        out = (self._attend(q, k, v, pos, cache, last_only) if pos.uniform
               else self._attend_rows(q, k, v, pos, cache, last_only))  # [B, H, Lq, d]
        return linear(self.wo, out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1))  # -> [B, Lq, H*d]

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, pos: Positions,
                cache: KVCache | ChunkedKVCache | None, last_only: bool) -> mx.array:
        """Rows together at one start: masks from host-side spans."""
        position, L = pos.start, q.shape[2]
        k_start = position
        if cache is not None:
            k, v, k_start = cache.update_and_fetch(k, v)  # [B, K, S, d]
        if last_only and L > 1:
            q, position, L = q[:, :, -1:], position + L - 1, 1  # [B, H, 1, d]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5,
                                                    mask=self._mask(position, L, k_start, k.shape[2]))

    def _attend_rows(self, q: mx.array, k: mx.array, v: mx.array, pos: Positions,
                     cache: KVCache | ChunkedKVCache | None, last_only: bool) -> mx.array:
        """Rows at their own positions: masks from query and key positions."""
        q_pos = k_pos = pos.q_pos  # [B, L]
        if cache is not None:
            k, v, k_pos = cache.update_rows(k, v, pos.spans, q_pos)  # [B, K, S, d], positions [B or 1, S]
        if last_only and q.shape[2] > 1:
            q, q_pos = pos.last(q, axis=2), pos.last(q_pos)  # [B, H, 1, d], [B, 1]
        mask = row_mask(q_pos, k_pos, self.chunk)[:, None]  # [B, 1, Lq, S] over heads
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
