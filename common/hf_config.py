"""Hugging Face `config.json` <-> `ModelArgs`.

Accepts both the transformers-5 form (`rope_parameters`, `layer_types`) and the form of the released
repos (`rope_scaling` + top-level `rope_theta`, `attn_temperature_tuning` as the int 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.args import ModelArgs

from common.args import MoEArgs, QuantizationArgs, RopeScaling, VisionArgs
from common.config_fields import CONTEXT_LIMIT, LAYER_LIMIT, VOCAB_LIMIT, Fields


def _bad(name: str, msg: str) -> ValueError:
    return ValueError(f"invalid config.json: field '{name}': {msg}")


def _rope(c: Fields) -> tuple[float, RopeScaling | None]:
    params = c.sub("rope_parameters")
    if params is None:
        params = c.sub("rope_scaling") or Fields({}, "rope_scaling")
    theta = params.float("rope_theta", c.float("rope_theta", 500000.0, lo=1e-6), lo=1e-6)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise _bad("rope_scaling.rope_type", f"expected 'default' or 'llama3', got {kind!r:.60}")
    return theta, RopeScaling(
        factor=params.float("factor", lo=1e-6),
        low_freq_factor=params.float("low_freq_factor", 1.0, lo=1e-6),
        high_freq_factor=params.float("high_freq_factor", 4.0, lo=1e-6),
        original_max_position_embeddings=params.int("original_max_position_embeddings", 8192, hi=CONTEXT_LIMIT),
    )


def _text_config(config: dict[str, Any]) -> Fields:
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == "llama4":
        if not isinstance(config.get("text_config"), dict):
            raise _bad("text_config", "model_type 'llama4' needs a text_config object")
        return Fields(config["text_config"], "text_config")
    if kind == "llama4_text":
        return Fields(config, "")
    raise _bad("model_type", f"expected 'llama4' or 'llama4_text', got {kind!r:.60}")


def _layers(c: Fields, n_layers: int) -> tuple[tuple[bool, ...], tuple[int, ...], MoEArgs | None]:
    """RoPE flag per layer, MoE layer indices and the MoE config."""
    no_rope = c.int_list("no_rope_layers", 0, 1, max_len=n_layers)
    if no_rope:
        if len(no_rope) != n_layers:
            raise _bad("no_rope_layers", f"expected {n_layers} entries, got {len(no_rope)}")
        rope_layers = tuple(bool(v) for v in no_rope)
    else:
        interval = c.int("no_rope_layer_interval", 4, hi=LAYER_LIMIT)
        rope_layers = tuple((i + 1) % interval != 0 for i in range(n_layers))
    step = c.int("interleave_moe_layer_step", 1, lo=0, hi=LAYER_LIMIT)
    moe_layers = c.int_list("moe_layers", 0, n_layers - 1, max_len=n_layers)
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step)) if step > 0 else []
    moe_args = None
    if moe_layers:
        moe_args = MoEArgs(num_experts=c.int("num_local_experts", 16), top_k=c.int("num_experts_per_tok", 1),
                           interleave_moe_layer_step=max(step, 1))
    return rope_layers, tuple(moe_layers), moe_args


def _quantization(config: dict[str, Any]) -> QuantizationArgs | None:
    raw = config.get("quantization") or config.get("quantization_config")
    if raw is None:
        return None
    quant = Fields(raw, "quantization")
    if not quant.has("bits"):
        return None
    if quant.get("mode", "affine") != "affine":
        raise _bad("quantization.mode", f"only MLX affine quantization is supported, got {quant.get('mode')!r:.60}")
    return QuantizationArgs(group_size=quant.int("group_size"), bits=quant.int("bits"))


def parse_hf_config(cls: type[ModelArgs], config: dict[str, Any]) -> ModelArgs:
    c = _text_config(config)
    dim, n_layers = c.int("hidden_size"), c.int("num_hidden_layers", hi=LAYER_LIMIT)
    n_heads = c.int("num_attention_heads")
    n_kv = c.int("num_key_value_heads", n_heads)
    head_dim = c.int("head_dim", max(dim // n_heads, 1))
    theta, scaling = _rope(c)
    rope_layers, moe_layers, moe_args = _layers(c, n_layers)
    vision = None
    if config.get("model_type") == "llama4" and isinstance(config.get("vision_config"), dict):
        vision = VisionArgs.from_hf_config(config["vision_config"])
    return cls(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=c.int("vocab_size", hi=VOCAB_LIMIT),
        head_dim=head_dim,
        ffn_hidden_dim=c.int("intermediate_size_mlp", 16384),
        norm_eps=c.float("rms_norm_eps", 1e-5, lo=0),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_chunk_size=c.int("attention_chunk_size", None, hi=CONTEXT_LIMIT) if "attention_chunk_size" in
        c.d else 8192,
        use_qk_norm=c.bool("use_qk_norm", True),
        attn_temperature_tuning=c.bool("attn_temperature_tuning", True),
        floor_scale=c.float("floor_scale", 8192.0, lo=1e-6),
        attn_scale=c.float("attn_scale", 0.1),
        moe_args=moe_args,
        moe_hidden_dim=c.int("intermediate_size", 8192),
        rope_layers=rope_layers,
        moe_layers=moe_layers,
        max_seq_len=c.int("max_position_embeddings", 131072, hi=CONTEXT_LIMIT),
        vision_args=vision,
        quantization=_quantization(config),
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
