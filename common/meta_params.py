"""Meta `params.json` -> `ModelArgs`, with the reference's defaults, derived widths and checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from common.args import MoEArgs, RopeScaling, VisionArgs, require_field
from common.config_fields import CONTEXT_LIMIT, LAYER_LIMIT, REQUIRED, VOCAB_LIMIT, Fields

if TYPE_CHECKING:
    from common.args import ModelArgs


def parse_params(cls: type[ModelArgs], params: dict[str, Any], max_seq_len: int | None = None) -> ModelArgs:
    """Flat params.json (a nested `model` object is accepted too); unknown keys are ignored."""
    top = Fields(params, "")
    p = Fields(top.get("model"), "model") if not top.has("dim") and top.has("model") else top
    dim, n_heads, n_layers = p.int("dim"), p.int("n_heads"), p.int("n_layers", hi=LAYER_LIMIT)
    require_field(p.has("n_kv_heads"), "n_kv_heads", "missing from params.json (required)")
    require_field(dim % n_heads == 0, "dim", f"must divide by n_heads={n_heads}")
    multiple_of = p.int("multiple_of", 256)
    mult = p.float("ffn_dim_multiplier", None, lo=1e-3, hi=1e3)

    hidden = int(2 * int(4 * dim) / 3)
    if mult is not None:
        hidden = int(mult * hidden)
    ffn_hidden = multiple_of * math.ceil(hidden / multiple_of)

    moe_args, moe_hidden, moe_layers = None, 0, ()
    m = p.sub("moe_args")
    if m is not None:
        moe_args = MoEArgs(num_experts=m.int("num_experts"), top_k=m.int("top_k", 1),
                           interleave_moe_layer_step=m.int("interleave_moe_layer_step", 1, hi=LAYER_LIMIT),
                           capacity_factor=m.float("capacity_factor", 1.0, lo=0, hi=1e3),
                           auto_scale_F=m.bool("auto_scale_F", True))
        require_field(mult is not None, "ffn_dim_multiplier", "required when moe_args is set")
        h = int(p.float("ffn_exp", REQUIRED, lo=1e-3, hi=1e3) * dim)
        h = int(mult * int(2 * h / 3))
        if moe_args.auto_scale_F:
            h = int(h / (moe_args.capacity_factor + 1))
        moe_hidden = h + (-h) % multiple_of
        step = moe_args.interleave_moe_layer_step
        moe_layers = tuple(i for i in range(n_layers) if (i + 1) % step == 0)

    scaling = None
    if p.bool("use_scaled_rope", False):
        scaling = RopeScaling(factor=p.float("rope_scaling_factor", 16.0, lo=1e-6), low_freq_factor=1.0,
                              high_freq_factor=p.float("rope_high_freq_factor", 1.0, lo=1e-6),
                              original_max_position_embeddings=8192)
    interval = p.int("nope_layer_interval", 0, lo=0, hi=LAYER_LIMIT)
    rope_layers = tuple(not (interval and (i + 1) % interval == 0) for i in range(n_layers))
    vision = p.sub("vision_args")
    return cls(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=p.int("n_kv_heads"),
        vocab_size=p.int("vocab_size", hi=VOCAB_LIMIT),
        head_dim=dim // n_heads,  # Meta's text attention ignores params' head_dim
        ffn_hidden_dim=ffn_hidden,
        norm_eps=p.float("norm_eps", 1e-5, lo=0),
        rope_theta=p.float("rope_theta", 500000.0, lo=1e-6),
        rope_scaling=scaling,
        attention_chunk_size=p.int("attention_chunk_size", None, hi=CONTEXT_LIMIT),
        use_qk_norm=p.bool("use_qk_norm", False),
        attn_temperature_tuning=p.bool("attn_temperature_tuning", False),
        floor_scale=p.float("floor_scale", 8192.0, lo=1e-6),
        attn_scale=p.float("attn_scale", 0.1),
        moe_args=moe_args,
        moe_hidden_dim=moe_hidden,
        rope_layers=rope_layers,
        moe_layers=moe_layers,
        max_seq_len=max_seq_len or p.int("max_seq_len", 131072, hi=CONTEXT_LIMIT),
        vision_args=None if vision is None else VisionArgs.from_params(vision.d),
        extra={"multiple_of": multiple_of, "ffn_dim_multiplier": mult, "ffn_exp": p.get("ffn_exp")},
    )
