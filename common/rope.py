"""Shared numerics for both backends, in numpy: RoPE frequencies (llama3 scaling), temperature
tuning scales and chunk bounds."""

from __future__ import annotations

import math

import numpy as np

from common.args import RopeScaling


def rope_inv_freqs(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim/2], float32, for interleaved-pair RoPE.

    llama3 scaling keeps short wavelengths, divides long ones by `factor` and blends the middle
    band. The band is chosen per frequency before any division, so low == high factor (Scout
    Instruct) never evaluates the 0/0 blend.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    old = float(scaling.original_max_position_embeddings)
    low_wl = old / scaling.low_freq_factor
    high_wl = old / scaling.high_freq_factor
    out = np.empty_like(inv)
    for j, f in enumerate(inv.astype(np.float64)):
        wl = 2 * math.pi / f
        if wl < high_wl:
            out[j] = f
        elif wl > low_wl:
            out[j] = f / scaling.factor
        else:
            s = (old / wl - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
            out[j] = (1 - s) * f / scaling.factor + s * f
    return out


def rope_cos_sin(inv_freqs: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the angles p * inv_freq for p in [start, start+length): each [length, d/2]."""
    pos = np.arange(start, start + length, dtype=np.float32)
    angles = np.outer(pos, inv_freqs).astype(np.float32)  # [L, d/2]
    return np.cos(angles), np.sin(angles)


def temperature_scales(start: int, length: int, floor_scale: float, attn_scale: float) -> np.ndarray:
    """Query scale of NoPE layers, [length] float32: 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale))."""
    return temperature_scales_at(np.arange(start, start + length), floor_scale, attn_scale)


def temperature_scales_at(positions: np.ndarray, floor_scale: float, attn_scale: float) -> np.ndarray:
    """`temperature_scales` at any array of absolute positions (same shape, float32)."""
    pos = np.asarray(positions, dtype=np.float64)
    return (1.0 + attn_scale * np.log1p(np.floor((pos + 1.0) / floor_scale))).astype(np.float32)


def chunk_start(position: int, chunk: int) -> int:
    """First absolute position of the attention chunk holding `position` (chunks align to 0)."""
    return (position // chunk) * chunk


def attention_mask(q_start: int, q_len: int, k_start: int, k_len: int, chunk: int | None) -> np.ndarray:
    """Bool [q_len, k_len], True where query may attend key (absolute positions).

    Causal, and with `chunk` also restricted to the query's own fixed chunk (iRoPE local attention).
    """
    q = np.arange(q_start, q_start + q_len)[:, None]
    k = np.arange(k_start, k_start + k_len)[None, :]
    allowed = k <= q
    if chunk is not None:
        allowed &= (k // chunk) == (q // chunk)
    return allowed


def vision_rope_cos_sin(grid: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the image encoder's 2-D RoPE, each [grid*grid + 1, head_dim/2], float32.

    Rows are the patches in row-major order, then CLS (angle 0). Of the head_dim/2 pairs, the first
    quarter of the dims rotate by the patch column x + 1 and the second by its row y + 1 (1-based),
    both with frequencies theta^(-4j / head_dim), as Meta's encoder and HF compute them.
    """
    freqs = 1.0 / theta ** (np.arange(head_dim // 4, dtype=np.float64) * 4.0 / head_dim)  # [d/4]
    t = np.arange(grid * grid)
    x, y = (t % grid + 1).astype(np.float64), (t // grid + 1).astype(np.float64)
    angles = np.concatenate([np.outer(x, freqs), np.outer(y, freqs)], axis=1)  # [G*G, d/2]
    angles = np.concatenate([angles, np.zeros((1, head_dim // 2))], axis=0)  # CLS last: [G*G+1, d/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
