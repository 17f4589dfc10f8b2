"""Canonical parameter names and shapes, shared by both backends (vision: Meta's module names).

Weights are [out, in]; experts are [E, out, in]. See the design contract for the full list.
"""

from __future__ import annotations

from common.args import ModelArgs, VisionArgs


def canonical_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter the backends hold, with its shape: text in layer order, then vision if any."""
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
    if args.vision_args is not None:
        shapes.update(vision_shapes(args.vision_args, D))
    return shapes


def vision_shapes(v: VisionArgs, text_dim: int) -> dict[str, tuple[int, ...]]:
    """The image encoder, adapter and projection, under Meta's module names (reference §3.4)."""
    W, F, Out, G = v.dim, v.hidden_dim, v.output_dim, v.grid
    enc = "vision_embeddings.vision_encoder."
    shapes: dict[str, tuple[int, ...]] = {
        enc + "conv1._linear.weight": (W, 3 * v.patch_size**2),  # patch pixels in (channel, y, x) order
        enc + "class_embedding": (W,),
        enc + "positional_embedding_vlm": (G * G + 1, W),  # patches row-major, then CLS
    }
    for norm in ("ln_pre", "ln_post"):
        shapes[f"{enc}{norm}.weight"] = shapes[f"{enc}{norm}.bias"] = (W,)
    for i in range(v.n_layers):
        p = f"{enc}transformer.resblocks.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            shapes[f"{p}attn.{w}.weight"], shapes[f"{p}attn.{w}.bias"] = (W, W), (W,)
        for norm in ("ln_1", "ln_2"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (W,)
        shapes[p + "mlp.c_fc.weight"], shapes[p + "mlp.c_fc.bias"] = (F, W), (F,)
        shapes[p + "mlp.c_proj.weight"], shapes[p + "mlp.c_proj.bias"] = (W, F), (W,)
    shapes["vision_embeddings.vision_adapter.mlp.c_fc.weight"] = (Out, v.adapter_dim)
    shapes["vision_embeddings.vision_adapter.mlp.c_proj.weight"] = (Out, Out)
    shapes["vision_projection.weight"] = (text_dim, Out)
    return shapes


def is_norm(name: str) -> bool:
    """Norm weights (kept in full precision by quantization, initialised far from 1 by tests)."""
    return name.endswith("norm.weight")
