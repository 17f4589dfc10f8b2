"""Bytes one decoding step must read (active weights + cached keys and values), for rooflines.

A decode step multiplies one token by every active weight once, so it can go no faster than
memory bandwidth / bytes read. Active means: the embedding row, attention, norms, the router,
the shared expert and the top-k routed experts of each MoE layer (all E experts for an
implementation that runs every expert), the output matrix; plus each layer's cached keys and
values at the step's position.
"""

from __future__ import annotations

from common.args import ModelArgs

_FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_weight(dtype: str, group_size: int = 64, scale_bytes: int = 4) -> float:
    """float32/bfloat16/float16, or q8/q4 (MLX affine: packed bits plus a scale and a bias per group)."""
    if dtype in _FLOAT_BYTES:
        return float(_FLOAT_BYTES[dtype])
    bits = {"q8": 8, "q4": 4}[dtype]
    return bits / 8 + 2 * scale_bytes / group_size


def active_weights(args: ModelArgs, all_experts: bool = False) -> int:
    """Weights one decoding step reads (see the module doc)."""
    D, d, H, K = args.dim, args.head_dim, args.n_heads, args.n_kv_heads
    total = D + D + args.vocab_size * D  # embedding row, final norm, output
    for role in args.layer_roles:
        total += 2 * D + 2 * H * d * D + 2 * K * d * D  # norms, wq + wo, wk + wv
        if role.moe:
            routed = args.num_experts if all_experts else args.moe_args.top_k
            total += args.num_experts * D + (1 + routed) * 3 * args.moe_hidden_dim * D
        else:
            total += 3 * args.ffn_hidden_dim * D
    return total


def kv_bytes(args: ModelArgs, start: int, steps: int, value_bytes: float) -> float:
    """Mean bytes of cached keys and values read per step, decoding positions start .. start+steps-1."""
    C = args.attention_chunk_size
    per_position = 2 * args.n_kv_heads * args.head_dim * value_bytes
    total = 0.0
    for p in range(start, start + steps):
        for role in args.layer_roles:
            total += per_position * ((p % C + 1) if role.chunked and C else p + 1)
    return total / max(steps, 1)


def decode_bytes(args: ModelArgs, dtype: str, start: int, steps: int, all_experts: bool = False) -> float:
    """Bytes read per decoded token: active weights in `dtype` plus the KV cache (float32 under q4/q8)."""
    kv_value = _FLOAT_BYTES.get(dtype, 4)
    return active_weights(args, all_experts) * bytes_per_weight(dtype) + kv_bytes(args, start, steps, kv_value)
