"""Model configuration as frozen dataclasses, built from Meta `params.json` or HF `config.json`.

Per-layer roles (RoPE or NoPE, chunked or global attention, MoE or dense, QK norm) are computed
once here, as data, and read by both backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


def require_field(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"invalid model config: field '{name}': {msg}")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Meta `use_scaled_rope`, HF `rope_type: llama3`)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        require_field(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        require_field(self.low_freq_factor > 0, "rope_scaling.low_freq_factor", "must be > 0")
        require_field(
            self.high_freq_factor >= self.low_freq_factor,
            "rope_scaling.high_freq_factor",
            f"must be >= low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}",
        )


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int = 1
    interleave_moe_layer_step: int = 1
    capacity_factor: float = 1.0
    auto_scale_F: bool = True

    def __post_init__(self) -> None:
        require_field(self.num_experts >= 1, "moe_args.num_experts", f"must be >= 1, got {self.num_experts}")
        require_field(
            1 <= self.top_k <= self.num_experts,
            "moe_args.top_k",
            f"must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        require_field(self.interleave_moe_layer_step >= 1, "moe_args.interleave_moe_layer_step", "must be >= 1")


def _square(v: Any, name: str) -> int:
    """A side length from an int, Meta's {"height", "width"} or HF's [height, width]; only squares."""
    if isinstance(v, dict):
        v = (v.get("height"), v.get("width"))
    if isinstance(v, (list, tuple)):
        require_field(len(v) == 2 and v[0] == v[1], name, f"only square sizes are supported, got {v}")
        v = v[0]
    require_field(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16, name,
                  f"expected a positive int up to 65536, got {v!r:.60}")
    return int(v)


@dataclass(frozen=True)
class VisionArgs:
    """The image encoder (ViT), its pixel-shuffle adapter and the tile size; defaults are Scout's."""

    image_size: int = 336  # tile side in pixels
    patch_size: int = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 4096  # adapter output, the input of vision_projection
    pixel_shuffle_ratio: float = 0.5
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require_field(self.image_size % self.patch_size == 0, "vision.image_size", "must divide by patch_size")
        require_field(self.dim % self.n_heads == 0, "vision.dim", f"must divide by n_heads={self.n_heads}")
        # 2-D RoPE: a quarter of each head's dims rotate by x, a quarter by y (pairs of two).
        require_field(self.head_dim % 4 == 0, "vision.dim", f"dim / n_heads must divide by 4, got {self.head_dim}")
        s = self.shuffle_factor
        require_field(0 < self.pixel_shuffle_ratio <= 1 and abs(s * self.pixel_shuffle_ratio - 1) < 1e-6,
                 "vision.pixel_shuffle_ratio", f"must be 1/n for an integer n, got {self.pixel_shuffle_ratio}")
        require_field(self.grid % s == 0, "vision.pixel_shuffle_ratio",
                 f"the patch grid ({self.grid}) must divide by {s}")
        require_field(self.hidden_dim > 0 and self.output_dim > 0, "vision.mlp_ratio/output_dim", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per tile side (24 for the real models)."""
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by the pixel shuffle: round(1 / pixel_shuffle_ratio)."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def adapter_dim(self) -> int:
        """Width after the pixel shuffle, the adapter's input (5632 for the real models)."""
        return self.dim * self.shuffle_factor**2

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens per tile after pixel shuffle (144 for the real models)."""
        return self.grid**2 // self.shuffle_factor**2

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> VisionArgs:
        """Meta `params.json` `vision_args` (all fields required, as in the reference)."""
        from common.config_fields import LAYER_LIMIT, REQUIRED, Fields

        f = Fields(p, "vision_args")
        for name in ("image_size", "patch_size"):
            require_field(f.has(name), f"vision_args.{name}", "missing from params.json")
        return cls(
            image_size=_square(f.get("image_size"), "vision_args.image_size"),
            patch_size=_square(f.get("patch_size"), "vision_args.patch_size"),
            dim=f.int("dim"),
            n_layers=f.int("n_layers", hi=LAYER_LIMIT),
            n_heads=f.int("n_heads"),
            mlp_ratio=f.float("mlp_ratio", REQUIRED, lo=1e-3, hi=1e3),
            output_dim=f.int("output_dim"),
            pixel_shuffle_ratio=f.float("pixel_shuffle_ratio", REQUIRED, lo=1e-3, hi=1),
        )

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> VisionArgs:
        """HF `vision_config` (Llama4VisionConfig); a missing field takes the released models' value.

        transformers sizes the adapter's first linear from `intermediate_size` (it equals the
        pixel-shuffled width dim / ratio^2 in the real models) and the projector from
        `vision_output_dim`, so those must agree with the ViT and adapter widths.
        """
        from common.config_fields import LAYER_LIMIT, Fields

        f = Fields(c, "vision_config")
        dim, ratio = f.int("hidden_size", 1408), f.float("pixel_shuffle_ratio", 0.5, lo=1e-3, hi=1)
        hidden = f.int("intermediate_size", 5632)
        out = {k: f.int(k) for k in ("vision_output_dim", "projector_input_dim", "projector_output_dim") if f.has(k)}
        require_field(len(set(out.values())) <= 1, "vision_config.vision_output_dim",
                 f"vision_output_dim, projector_input_dim and projector_output_dim must be equal, got {out}")
        rope = f.sub("rope_parameters") or Fields({}, "vision_config.rope_parameters")
        args = cls(
            image_size=_square(f.get("image_size", 336), "vision_config.image_size"),
            patch_size=_square(f.get("patch_size", 14), "vision_config.patch_size"),
            dim=dim,
            n_layers=f.int("num_hidden_layers", 34, hi=LAYER_LIMIT),
            n_heads=f.int("num_attention_heads", 16),
            mlp_ratio=hidden / dim,
            output_dim=next(iter(out.values()), 4096),
            pixel_shuffle_ratio=ratio,
            norm_eps=f.float("norm_eps", 1e-5, lo=0),
            rope_theta=rope.float("rope_theta", f.float("rope_theta", 10000.0, lo=1e-6), lo=1e-6),
        )
        require_field(args.hidden_dim == hidden, "vision_config.intermediate_size",
                 f"{hidden} is not a whole multiple of hidden_size {dim} that round-trips")
        require_field(hidden == args.adapter_dim, "vision_config.intermediate_size",
                 f"transformers feeds the pixel-shuffled width (hidden_size / pixel_shuffle_ratio^2 = "
                 f"{args.adapter_dim}) to a linear of input intermediate_size = {hidden}; they must be equal")
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """A `vision_config` that transformers and `from_hf_config` read back to these args."""
        return {
            "model_type": "llama4_vision_model", "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "intermediate_size": self.hidden_dim,
            "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": 3,
            "pixel_shuffle_ratio": self.pixel_shuffle_ratio, "vision_output_dim": self.output_dim,
            "projector_input_dim": self.output_dim, "projector_output_dim": self.output_dim,
            "norm_eps": self.norm_eps, "hidden_act": "gelu", "multi_modal_projector_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        }


@dataclass(frozen=True)
class QuantizationArgs:
    """MLX affine quantization: `bits` per weight, one scale and bias per `group_size` inputs."""

    group_size: int = 64
    bits: int = 4

    def __post_init__(self) -> None:
        require_field(self.bits in (2, 3, 4, 5, 6, 8), "quantization.bits", f"unsupported value {self.bits}")
        require_field(self.group_size in (32, 64, 128), "quantization.group_size", f"unsupported {self.group_size}")


@dataclass(frozen=True)
class LayerRole:
    use_rope: bool  # False: NoPE layer (global causal attention, temperature tuning)
    chunked: bool  # chunked local attention (RoPE layers when attention_chunk_size is set)
    moe: bool
    qk_norm: bool
    temperature_tuning: bool


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    head_dim: int
    ffn_hidden_dim: int  # dense SwiGLU width (HF intermediate_size_mlp)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    attention_chunk_size: int | None = None
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    moe_args: MoEArgs | None = None
    moe_hidden_dim: int = 0  # expert and shared-expert width (HF intermediate_size)
    rope_layers: tuple[bool, ...] = ()  # per layer: True = uses RoPE (HF no_rope_layers == 1)
    moe_layers: tuple[int, ...] = ()
    max_seq_len: int = 131072
    vision_args: VisionArgs | None = None
    quantization: QuantizationArgs | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "head_dim", "ffn_hidden_dim"):
            require_field(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        require_field(self.n_kv_heads <= self.n_heads, "n_kv_heads", f"must be <= n_heads={self.n_heads}")
        require_field(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
        require_field(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)")
        require_field(len(self.rope_layers) == self.n_layers, "no_rope_layers",
                 f"needs one entry per layer ({self.n_layers}), got {len(self.rope_layers)}")
        require_field(all(0 <= i < self.n_layers for i in self.moe_layers), "moe_layers",
                 f"indices must be in [0, {self.n_layers}), got {list(self.moe_layers)}")
        require_field(not self.moe_layers or self.moe_args is not None, "moe_layers", "MoE layers need moe_args")
        require_field(not self.moe_layers or self.moe_hidden_dim > 0, "intermediate_size",
                 "MoE layers need the expert width")
        require_field(self.attention_chunk_size is None or self.attention_chunk_size > 0,
                 "attention_chunk_size", "must be > 0 or null")
        require_field(self.floor_scale > 0, "floor_scale", "must be > 0")
        require_field(self.max_seq_len > 0, "max_seq_len", "must be > 0")

    @cached_property
    def layer_roles(self) -> tuple[LayerRole, ...]:
        moe = set(self.moe_layers)
        return tuple(
            LayerRole(
                use_rope=rope,
                chunked=rope and self.attention_chunk_size is not None,
                moe=i in moe,
                qk_norm=rope and self.use_qk_norm,
                temperature_tuning=(not rope) and self.attn_temperature_tuning,
            )
            for i, rope in enumerate(self.rope_layers)
        )

    @property
    def num_experts(self) -> int:
        return self.moe_args.num_experts if self.moe_args else 0

    @classmethod
    def from_params(cls, params: dict[str, Any], max_seq_len: int | None = None) -> ModelArgs:
        """Meta `params.json` (flat; unknown keys ignored), with the reference's defaults and checks."""
        from common.meta_params import parse_params

        return parse_params(cls, params, max_seq_len)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """HF `config.json`: `model_type` `llama4` (with `text_config`) or `llama4_text`."""
        from common.hf_config import parse_hf_config

        return parse_hf_config(cls, config)
