"""Llama 4 attention: GQA with interleaved RoPE and QK norm (RoPE layers) or temperature-tuned
global attention (NoPE layers).

Shapes: B batch, L query length, S key length, H query heads, K kv heads, G = H / K, d head dim,
D model dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.args import LayerRole, ModelArgs
from common.rope import attention_mask, chunk_start, rope_cos_sin, rope_inv_freqs, temperature_scales
from common.spans import RowSpans
from torch_backend import cpu_kernels
from torch_backend.cache import ChunkedKVCache, KVCache
from torch_backend.device import to_device_mask
from torch_backend.fused import FusedGroup, FusedModule, linear


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, computed in float32 and cast back to x's dtype."""
    if x.device.type == "cpu":
        # The CPU kernel computes float16/bfloat16 in float32 and rounds once: bit for bit the cast
        # pair below (tests/test_fast_paths.py), in one call instead of three.
        return F.rms_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _GrowingTable:
    """Rows 0 .. n-1 of a per-position table, computed by `make(start, length)` on a device; grows
    by doubling, so a decode loop computes nothing per step."""

    def __init__(self, make: Callable[[int, int], torch.Tensor], limit: int) -> None:
        self.make, self.limit = make, limit
        self.rows: torch.Tensor | None = None

    def __call__(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """Rows start .. start+length-1, growing the table first where it is short."""
        end = start + length
        if self.rows is None or self.rows.device != device or end > self.rows.shape[0]:
            size = min(max(end, 256, 2 * (0 if self.rows is None else self.rows.shape[0])), max(self.limit, end))
            self.rows = self.make(0, size).to(device)
        return self.rows[start:end]


class RotaryTable:
    """RoPE rotations per absolute position as complex float32 (cos + i sin), [L, d/2].

    A plain object rather than a buffer, so `model.to(dtype)` never rounds the frequencies; the
    values are common.rope's, computed once per position. Stored as real (cos, sin) pairs [L, d/2, 2]
    (`rows`), which the fixed-shape decode step indexes: a compiled step then holds no complex tensor.
    """

    def __init__(self, args: ModelArgs) -> None:
        self.inv_freqs = rope_inv_freqs(args.head_dim, args.rope_theta, args.rope_scaling)
        self._table = _GrowingTable(self._make, args.max_seq_len)

    def _make(self, start: int, length: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(self.inv_freqs, start, length)  # each [L, d/2]
        return torch.stack([torch.from_numpy(cos), torch.from_numpy(sin)], dim=-1)  # [L, d/2, 2]

    def __call__(self, position: int, length: int, device: torch.device) -> torch.Tensor:
        """Complex rotations [length, d/2] (a view of the stored pairs)."""
        return torch.view_as_complex(self._table(position, length, device))

    @property
    def rows(self) -> torch.Tensor | None:
        """Every row computed so far (positions 0 .. n-1) as (cos, sin) pairs, [n, d/2, 2]."""
        return self._table.rows


class Positions:
    """What every layer of one forward shares: its rows' spans, positions' rotations, NoPE query scales
    and masks. Uniform forwards (one start, no padding) keep host-side starts; others carry per-row
    positions as a device tensor `q_pos` [B, L]."""

    def __init__(self, args: ModelArgs, rope: RotaryTable, temps: _GrowingTable | None, spans: RowSpans,
                 device: torch.device) -> None:
        self.spans, self.uniform, self.device = spans, spans.uniform, device
        self.start, self.length = spans.start, spans.width
        use_rope = any(r.use_rope for r in args.layer_roles)
        if self.uniform:
            # [L, d/2] -> [L, 1, d/2]: broadcast over heads once per forward, not once per layer
            self.rope = rope(self.start, self.length, device)[:, None, :] if use_rope else None
            self.temps = None if temps is None else temps(self.start, self.length, device)[:, None, None]  # [L, 1, 1]
        else:
            self.q_pos = torch.from_numpy(spans.positions()).to(device)  # [B, L]
            top = int(spans.starts.max()) + spans.width
            self.rope = rope(0, top, device)[self.q_pos][:, :, None, :] if use_rope else None  # [B, L, 1, d/2]
            self.temps = None if temps is None else temps(0, top, device)[self.q_pos][..., None, None]  # [B, L, 1, 1]
            self.last_at = torch.from_numpy(spans.lengths - 1).to(device)  # [B] index of each row's last token
        self._masks: dict[tuple[int, int, int, int, int | None], torch.Tensor] = {}

    @classmethod
    def for_decode(cls, args: ModelArgs, rope: RotaryTable, temps: _GrowingTable | None,
                   positions: torch.Tensor) -> Positions:
        """One position per row from a device tensor [B], without host reads (the fixed-shape decode
        step); the tables must already hold these positions (`Transformer.prepare_decode`)."""
        self = cls.__new__(cls)
        self.spans, self.uniform, self.device, self.start, self.length = None, False, positions.device, -1, 1
        self.q_pos = positions[:, None]  # [B] -> [B, 1]
        use_rope = any(r.use_rope for r in args.layer_roles)
        self.rope = rope.rows[self.q_pos][:, :, None] if use_rope else None  # (cos, sin) [B, 1, 1, d/2, 2]
        self.temps = None if temps is None else temps.rows[self.q_pos][..., None, None]  # [B, 1, 1, 1]
        self._masks = {}
        return self

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real position of x [B, L, ...] -> [B, 1, ...]."""
        if self.uniform:
            return x[:, -1:]
        return x[torch.arange(x.shape[0], device=x.device), self.last_at][:, None]  # [B, 1, ...]

    def row_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """`row_mask` for this forward; a decode step's key positions depend only on the layer kind and
        the key count, so its masks are built once per forward and shared by the layers of a kind (a
        compiled step builds each; the compiler merges equal ones, and a lookup would fix the key count)."""
        if self.length != 1 or torch.compiler.is_compiling():
            return row_mask(q_pos, k_pos, chunk)
        key = (-1, 1, -1, k_pos.shape[-1], chunk)
        if key not in self._masks:
            self._masks[key] = row_mask(q_pos, k_pos, chunk)
        return self._masks[key]

    def mask(self, q_start: int, q_len: int, k_start: int, S: int, chunk: int | None) -> torch.Tensor:
        """Bool [q_len, S] (True = may attend), built once per forward for each span and chunking."""
        key = (q_start, q_len, k_start, S, chunk)
        if key not in self._masks:
            self._masks[key] = to_device_mask(attention_mask(q_start, q_len, k_start, S, chunk), self.device)
        return self._masks[key]


def row_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Bool [B, Lq, S] from query positions [B, Lq] and key positions [B or 1, S]: causal, and within
    the query's chunk for chunked layers (empty slots sit at EMPTY, after every query)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = k <= q
    if chunk is not None:
        allowed &= (k // chunk) == (q // chunk)
    return allowed


def temperature_table(args: ModelArgs) -> _GrowingTable | None:
    """NoPE query scales per position (float32), or None when no layer tunes its temperature."""
    if not any(r.temperature_tuning for r in args.layer_roles):
        return None

    def make(start: int, length: int) -> torch.Tensor:
        return torch.from_numpy(temperature_scales(start, length, args.floor_scale, args.attn_scale))

    return _GrowingTable(make, args.max_seq_len)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x [B, L, heads, d] by position; fp32 math."""
    return rotate(x, torch.complex(cos, sin)[:, None, :])  # [L, d/2] -> [L, 1, d/2]


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, d] with pairs (x[2j], x[2j+1]) multiplied by complex `rotation` [L, 1, d/2] (or its
    real view [L, 1, d/2, 2]); fp32 math."""
    if not rotation.is_complex():  # (cos, sin) pairs: the same products in real numbers (compilable)
        cos, sin = rotation[..., 0], rotation[..., 1]
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, heads, d/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, heads, d/2] complex
    out = torch.view_as_real(pairs * rotation)  # [B, L, heads, d/2, 2]
    return out.flatten(-2).to(x.dtype)  # [B, L, heads, d]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q [B, 1, H, d], k/v [B, K, S, d] -> [B, 1, H*d]; `mask` [B, S] (True =
    may attend) where rows see different keys.

    Plain products (query heads grouped by their kv head, no copies of k/v) beat the fused CPU
    kernel several times at one query; the softmax runs in float32 as the fused kernels' does.
    On the CPU, bfloat16/float16 inputs are computed in float32: copies included, 2x faster than
    the reduced-precision batched products there (measured at 64 to 2,048 keys).
    """
    if cpu_kernels.attention_fits(q, k):  # the CPU kernel: the same float32 math, 3-5x faster at 256 keys
        return cpu_kernels.decode_attention(q, k, v, scale, mask)
    if torch.compiler.is_compiling() and q.device.type == "cpu":
        return _decode_attention_loops(q, k, v, scale, mask)
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return decode_attention(q.float(), k.float(), v.float(), scale, mask).to(q.dtype)
    B, _, H, d = q.shape
    K = k.shape[1]
    q = q.reshape(B, K, H // K, d)  # [B, 1, H, d] -> [B, K, G, d]: head h reads kv head h // G
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # [B, K, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # mask [B, S] -> [B, 1, 1, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, 1, H * d)  # [B, K, G, d] -> [B, 1, H*d]


def _decode_attention_loops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """`decode_attention` as broadcast products and sums, for the compiled CPU step: inductor fuses each
    into one loop that reads the cache in place (in float32, without a float32 copy of it), where the
    batched products cost a library call each (about 12 us per call at 256 keys on a 2-core CPU: 16
    calls a step of the small benchmark model)."""
    B, _, H, d = q.shape
    K = k.shape[1]
    q = q.float().reshape(B, K, H // K, 1, d)  # [B, 1, H, d] -> [B, K, G, 1, d]
    scores = (q * scale * k.float()[:, :, None]).sum(-1)  # [B, K, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # mask [B, S] -> [B, 1, 1, S]
    probs = torch.softmax(scores, dim=-1)  # [B, K, G, S]
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # [B, K, G, S, d] -> [B, K, G, d]
    return out.to(v.dtype).reshape(B, 1, H * d)  # [B, K, G, d] -> [B, 1, H*d]


class Attention(FusedModule):
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
        self._qkv = FusedGroup([(self.wq, "weight"), (self.wk, "weight"), (self.wv, "weight")])
        self._wo = FusedGroup([(self.wo, "weight")])

    def fused_groups(self) -> tuple[FusedGroup, ...]:
        return self._qkv, self._wo

    def _qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q|k heads [B, L, H+K, d] and v heads [B, L, K, d] from one product when fused."""
        B, L, _ = x.shape
        H, K = self.n_heads, self.n_kv_heads
        if self._qkv.quant is not None:
            qkv = self._qkv.quant.mm(x).view(B, L, H + 2 * K, -1)  # [B, L, H+2K, d]
            return qkv[:, :, : H + K], qkv[:, :, H + K :]
        w = self._qkv.weight()
        if w is None:
            qk = torch.cat([self.wq(x), self.wk(x)], dim=-1)  # [B, L, (H+K)*d]
            return qk.view(B, L, H + K, -1), self.wv(x).view(B, L, K, -1)
        qkv = linear(x, w).view(B, L, H + 2 * K, -1)  # [B, L, H+2K, d]
        return qkv[:, :, : H + K], qkv[:, :, H + K :]

    def _project(self, x: torch.Tensor, pos: Positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, L, H, d], k and v [B, L, K, d]; q and k rotated and normed together."""
        qk, v = self._qkv_heads(x)
        if self.role.use_rope:
            qk = rotate(qk, pos.rope)
        if self.role.qk_norm:
            qk = rms_norm(qk, self.norm_eps)
        q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
        if self.role.temperature_tuning:
            # Scaled in float32 and cast back, as HF does (Meta's reference promotes q instead).
            q = (q * pos.temps).to(x.dtype)  # temps [L, 1, 1] over [B, L, H, d]
        return q, k, v

    def forward(self, x: torch.Tensor, pos: Positions, cache: KVCache | ChunkedKVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with `last_only`, keys and values of every position still reach
        the cache but only each row's last position attends: [B, 1, D]."""
        q, k, v = self._project(x, pos)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, K, L, d]
        out = (self._attend(q, k, v, pos, cache, last_only) if pos.uniform
               else self._attend_rows(q, k, v, pos, cache, last_only))  # [B, Lq, H*d]
        if self._wo.quant is not None:
            return self._wo.quant.mm(out)
        w = self._wo.weight()
        return self.wo(out) if w is None else linear(out, w)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions,
                cache: KVCache | ChunkedKVCache | None, last_only: bool) -> torch.Tensor:
        """Rows together at one start: host-side spans and masks."""
        B, L = q.shape[:2]
        k_start, q_start = pos.start, pos.start
        if cache is not None:
            k, v, k_start = cache.update_and_fetch(k, v)  # [B, K, S, d]
        if last_only and L > 1:
            q, q_start, L = q[:, -1:], q_start + L - 1, 1  # [B, 1, H, d]
        if L == 1 and (self.chunk is None or k_start // self.chunk == q_start // self.chunk):
            return decode_attention(q, k, v, self.head_dim**-0.5)  # every key visible: [B, 1, H*d]
        if self.chunk is not None and k_start // self.chunk != (q_start + L - 1) // self.chunk:
            return self._attend_by_chunk(q, k, v, pos, q_start, k_start)
        return self._attend_span(q, k, v, pos, q_start, k_start)

    def _attend_by_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions, q_start: int,
                         k_start: int) -> torch.Tensor:
        """Each chunk's queries against that chunk's keys alone: memory O(L*C), not O(L*S), for a long
        prompt (the keys of positions k_start .. q_start+L-1 are k's)."""
        C, end, outs = self.chunk, q_start + q.shape[1], []
        a = q_start
        while a < end:
            first = chunk_start(a, C)
            b = min(first + C, end)
            keys = slice(first - k_start, b - k_start)  # this chunk's keys, up to its last query
            outs.append(self._attend_span(q[:, a - q_start : b - q_start], k[:, :, keys], v[:, :, keys], pos, a,
                                          first))  # [B, b-a, H*d]
            a = b
        return torch.cat(outs, dim=1)

    def _attend_span(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions, q_start: int,
                     k_start: int) -> torch.Tensor:
        """Causal attention of queries from q_start over keys from k_start (no chunk rule needed)."""
        if q_start == k_start and q.shape[1] == k.shape[2]:
            return self._sdpa(q, k, v, None)  # plain causal: the flash kernels where there are some
        return self._sdpa(q, k, v, pos.mask(q_start, q.shape[1], k_start, k.shape[2], self.chunk))  # [L, S]

    def _attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Positions,
                     cache: KVCache | ChunkedKVCache | None, last_only: bool) -> torch.Tensor:
        """Rows at their own positions: masks from query and key positions on the device."""
        q_pos = k_pos = pos.q_pos  # [B, L]
        if cache is not None and pos.spans is None:  # the fixed-shape decode step: the caller keeps the offsets
            k, v, k_pos = cache.decode_write(k, v, q_pos)  # [B, K, S, d], positions [B or 1, S]
        elif cache is not None:
            k, v, k_pos = cache.update_rows(k, v, pos.spans, q_pos)
        if last_only and q.shape[1] > 1:
            q, q_pos = pos.last(q), pos.last(q_pos)  # [B, 1, H, d], [B, 1]
        mask = pos.row_mask(q_pos, k_pos, self.chunk)  # [B, Lq, S]
        if q.shape[1] == 1:
            return decode_attention(q, k, v, self.head_dim**-0.5, mask[:, 0])
        return self._sdpa(q, k, v, mask[:, None])  # [B, 1, Lq, S] over heads

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, L, H, d], k/v [B, K, S, d], bool mask broadcastable to [B, H, L, S] (None: causal with
        L == S) -> [B, L, H*d]."""
        B, L = q.shape[:2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.head_dim**-0.5,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # [B, H, L, d]
        return out.transpose(1, 2).reshape(B, L, -1)  # [B, H, L, d] -> [B, L, H*d]
