"""Canonical parameter names and shapes of the text model, shared by both backends.

Weights are [out, in]; experts are [E, out, in]. See the design contract for the full list.
"""

from __future__ import annotations

from common.args import ModelArgs


def canonical_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every text-model parameter the backends hold, with its shape, in layer order."""
    D, V, d = args.dim, args.vocab_size, args.head_dim
    H, K = args.n_heads, args.n_kv_heads
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D)}
    for i, role in enumerate(args.layer_roles):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        shapes[p + "attention.wq.weight"] = (H * d, D)
        shapes[p + "attention.wk.weight"] = (K * d, D)
        shapes[p + "attention.wv.weight"] = (K * d, D)
        shapes[p + "attention.wo.weight"] = (D, H * d)
        shapes[p + "ffn_norm.weight"] = (D,)
        ff = p + "feed_forward."
        if role.moe:
            E, F = args.num_experts, args.moe_hidden_dim
            shapes[ff + "router.weight"] = (E, D)
            shapes[ff + "experts.w_gate"] = (E, F, D)
            shapes[ff + "experts.w_value"] = (E, F, D)
            shapes[ff + "experts.w_out"] = (E, D, F)
            shapes[ff + "shared_expert.w_gate.weight"] = (F, D)
            shapes[ff + "shared_expert.w_value.weight"] = (F, D)
            shapes[ff + "shared_expert.w_out.weight"] = (D, F)
        else:
            F = args.ffn_hidden_dim
            shapes[ff + "w_gate.weight"] = (F, D)
            shapes[ff + "w_value.weight"] = (F, D)
            shapes[ff + "w_out.weight"] = (D, F)
    shapes["norm.weight"] = (D,)
    shapes["output.weight"] = (V, D)
    return shapes


def is_norm(name: str) -> bool:
    """Norm weights (kept in full precision by quantization, initialised far from 1 by tests)."""
    return name.endswith("norm.weight")
