"""Hugging Face `config.json` <-> `ModelArgs`.

Accepts both the transformers-5 form (`rope_parameters`, `layer_types`) and the form of the released
repos (`rope_scaling` + top-level `rope_theta`, `attn_temperature_tuning` as the int 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.args import ModelArgs

from common.args import MoEArgs, QuantizationArgs, RopeScaling, VisionArgs


def _bad(name: str, msg: str) -> ValueError:
    return ValueError(f"invalid config.json: field '{name}': {msg}")


def _rope(c: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = c.get("rope_parameters")
    if params is None:
        params = dict(c.get("rope_scaling") or {})
        params.setdefault("rope_theta", c.get("rope_theta", 500000.0))
    theta = float(params.get("rope_theta", c.get("rope_theta", 500000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise _bad("rope_scaling.rope_type", f"expected 'default' or 'llama3', got {kind!r}")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    kind = config.get("model_type")
    if kind == "llama4":
        if not isinstance(config.get("text_config"), dict):
            raise _bad("text_config", "model_type 'llama4' needs a text_config object")
        return config["text_config"]
    if kind == "llama4_text":
        return config
    raise _bad("model_type", f"expected 'llama4' or 'llama4_text', got {kind!r}")


def parse_hf_config(cls: type[ModelArgs], config: dict[str, Any]) -> ModelArgs:
    c = _text_config(config)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if name not in c:
            raise _bad(name, "missing")
    dim, n_layers, n_heads = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_heads)
    head_dim = int(c.get("head_dim") or dim // n_heads)
    theta, scaling = _rope(c)

    no_rope = c.get("no_rope_layers") or []
    if no_rope:
        if len(no_rope) != n_layers:
            raise _bad("no_rope_layers", f"expected {n_layers} entries, got {len(no_rope)}")
        rope_layers = tuple(bool(int(v)) for v in no_rope)
    else:
        interval = int(c.get("no_rope_layer_interval", 4))
        rope_layers = tuple((i + 1) % interval != 0 for i in range(n_layers))

    n_experts = int(c.get("num_local_experts", 16))
    step = int(c.get("interleave_moe_layer_step", 1))
    moe_layers = c.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step)) if step > 0 else []
    moe_layers = tuple(int(i) for i in moe_layers)
    moe_args = None
    if moe_layers:
        moe_args = MoEArgs(num_experts=n_experts, top_k=int(c.get("num_experts_per_tok", 1)),
                           interleave_moe_layer_step=max(step, 1))

    tuning = c.get("attn_temperature_tuning", True)
    quant = config.get("quantization") or config.get("quantization_config")
    quantization = None
    if quant is not None and "bits" in quant:
        if quant.get("mode", "affine") != "affine":
            raise _bad("quantization.mode", f"only MLX affine quantization is supported, got {quant['mode']!r}")
        quantization = QuantizationArgs(group_size=int(quant["group_size"]), bits=int(quant["bits"]))
    vision = None
    if config.get("model_type") == "llama4" and isinstance(config.get("vision_config"), dict):
        vision = VisionArgs.from_hf_config(config["vision_config"])
    return cls(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=int(c["vocab_size"]),
        head_dim=head_dim,
        ffn_hidden_dim=int(c.get("intermediate_size_mlp", 16384)),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_chunk_size=c.get("attention_chunk_size", 8192),
        use_qk_norm=bool(c.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(tuning),
        floor_scale=float(c.get("floor_scale", 8192)),
        attn_scale=float(c.get("attn_scale", 0.1)),
        moe_args=moe_args,
        moe_hidden_dim=int(c.get("intermediate_size", 8192)),
        rope_layers=rope_layers,
        moe_layers=moe_layers,
        max_seq_len=int(c.get("max_position_embeddings", 131072)),
        vision_args=vision,
        quantization=quantization,
    )


def to_hf_text_config(args: ModelArgs) -> dict[str, Any]:
    """A `llama4_text` config.json that transformers and mlx-lm read back to the same model."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    step = args.moe_args.interleave_moe_layer_step if args.moe_args else 1
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.moe_hidden_dim or args.ffn_hidden_dim,
        "intermediate_size_mlp": args.ffn_hidden_dim,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if args.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "attention_chunk_size": args.attention_chunk_size,
        "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning,
        # transformers validates floor_scale as an int
        "floor_scale": int(args.floor_scale) if float(args.floor_scale).is_integer() else args.floor_scale,
        "attn_scale": args.attn_scale,
        "num_local_experts": max(args.num_experts, 1),
        "num_experts_per_tok": args.moe_args.top_k if args.moe_args else 1,
        "interleave_moe_layer_step": step,
        "moe_layers": list(args.moe_layers),
        "no_rope_layers": [int(r) for r in args.rope_layers],
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
    }
