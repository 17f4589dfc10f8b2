"""Meta `params.json` -> `ModelArgs`, with the reference's defaults, derived widths and checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from common.args import MoEArgs, RopeScaling, VisionArgs, require_field

if TYPE_CHECKING:
    from common.args import ModelArgs


def parse_params(cls: type[ModelArgs], params: dict[str, Any], max_seq_len: int | None = None) -> ModelArgs:
    """Flat params.json (a nested `model` object is accepted too); unknown keys are ignored."""
    p = params.get("model", params) if "dim" not in params else params
    for name in ("dim", "n_layers", "n_heads", "vocab_size"):
        require_field(name in p, name, "missing from params.json")
    dim, n_heads = int(p["dim"]), int(p["n_heads"])
    require_field(p.get("n_kv_heads") is not None, "n_kv_heads", "missing from params.json (required)")
    require_field(dim % n_heads == 0, "dim", f"must divide by n_heads={n_heads}")
    n_layers = int(p["n_layers"])
    multiple_of = int(p.get("multiple_of", 256))
    mult = p.get("ffn_dim_multiplier")

    hidden = int(2 * int(4 * dim) / 3)
    if mult is not None:
        hidden = int(float(mult) * hidden)
    ffn_hidden = multiple_of * math.ceil(hidden / multiple_of)

    moe_args, moe_hidden, moe_layers = None, 0, ()
    if p.get("moe_args"):
        m = p["moe_args"]
        moe_args = MoEArgs(
            num_experts=int(m.get("num_experts", -1)),
            top_k=int(m.get("top_k", 1)),
            interleave_moe_layer_step=int(m.get("interleave_moe_layer_step", 1)),
            capacity_factor=float(m.get("capacity_factor", 1.0)),
            auto_scale_F=bool(m.get("auto_scale_F", True)),
        )
        require_field(mult is not None, "ffn_dim_multiplier", "required when moe_args is set")
        require_field(p.get("ffn_exp") is not None, "ffn_exp", "required when moe_args is set")
        h = int(float(p["ffn_exp"]) * dim)
        h = int(float(mult) * int(2 * h / 3))
        if moe_args.auto_scale_F:
            h = int(h / (moe_args.capacity_factor + 1))
        moe_hidden = h + (-h) % multiple_of
        step = moe_args.interleave_moe_layer_step
        moe_layers = tuple(i for i in range(n_layers) if (i + 1) % step == 0)

    scaling = None
    if p.get("use_scaled_rope"):
        factor = p.get("rope_scaling_factor")
        high = p.get("rope_high_freq_factor")
        scaling = RopeScaling(
            factor=16.0 if factor is None else float(factor),
            low_freq_factor=1.0,
            high_freq_factor=1.0 if high is None else float(high),
            original_max_position_embeddings=8192,
        )
    interval = p.get("nope_layer_interval")
    rope_layers = tuple(not (interval and (i + 1) % int(interval) == 0) for i in range(n_layers))
    vision = VisionArgs.from_params(p["vision_args"]) if p.get("vision_args") else None
    return cls(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(p["n_kv_heads"]),
        vocab_size=int(p["vocab_size"]),
        head_dim=dim // n_heads,  # Meta's text attention ignores params' head_dim
        ffn_hidden_dim=ffn_hidden,
        norm_eps=float(p.get("norm_eps", 1e-5)),
        rope_theta=float(p.get("rope_theta", 500000.0)),
        rope_scaling=scaling,
        attention_chunk_size=p.get("attention_chunk_size"),
        use_qk_norm=bool(p.get("use_qk_norm", False)),
        attn_temperature_tuning=bool(p.get("attn_temperature_tuning", False)),
        floor_scale=float(p.get("floor_scale", 8192.0)),
        attn_scale=float(p.get("attn_scale", 0.1)),
        moe_args=moe_args,
        moe_hidden_dim=moe_hidden,
        rope_layers=rope_layers,
        moe_layers=moe_layers,
        max_seq_len=int(max_seq_len or p.get("max_seq_len") or 131072),
        vision_args=vision,
        extra={"multiple_of": multiple_of, "ffn_dim_multiplier": mult, "ffn_exp": p.get("ffn_exp")},
    )
