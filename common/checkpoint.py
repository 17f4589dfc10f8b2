"""Pure remapping of state dicts to the canonical parameter names and back.

Layouts: Hugging Face `Llama4ForCausalLM` and `Llama4ForConditionalGeneration` (fused `gate_up_proj`
experts, per-expert linears, mlx-lm's stacked experts) here; Meta native files in `meta_checkpoint`.
Each is a table of anchored key patterns with shape transforms. Results are `LazyDict`s, so a loader
can build one canonical tensor at a time from memory-mapped sources. Unknown keys raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from common.args import ModelArgs
from common.array_ops import (
    Array,
    CheckpointError,
    LazyDict,
    Rule,
    Thunk,
    concatenate,
    contiguous,
    remap,
    shape_of,
    split,
)
from common.meta_checkpoint import (
    META_MARKERS,
    META_VISION,
    canonical_to_meta,
    meta_shards_to_canonical,
    meta_to_canonical,
    shard_axis,
)
from common.names import canonical_shapes
from common.quant import STACKED, expected_names, expected_shapes, part_names, quant_prefix, split_part
from common.vision_checkpoint import HF_VISION_RULES, vision_hf_name

__all__ = [
    "CheckpointError", "LazyDict", "canonical_to_hf", "canonical_to_meta", "check_keys", "checked_items",
    "detect_layout", "hf_to_canonical", "meta_shards_to_canonical", "meta_to_canonical", "shard_axis",
    "split_vision",
]

_LM = r"(?:language_model\.)?"  # ConditionalGeneration nests the text model here
HF_VISION = r"vision_model\..+|multi_modal_projector\..+"
VISION = f"{HF_VISION}|{META_VISION}"

_HF_GLOBAL = (  # (HF name without the language_model. prefix, canonical name)
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
)
_HF_LAYER = (  # (HF name under model.layers.{i}., canonical name under layers.{i}.)
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attention.wq.weight"),
    ("self_attn.k_proj.weight", "attention.wk.weight"),
    ("self_attn.v_proj.weight", "attention.wv.weight"),
    ("self_attn.o_proj.weight", "attention.wo.weight"),
    ("feed_forward.gate_proj.weight", "feed_forward.w_gate.weight"),
    ("feed_forward.up_proj.weight", "feed_forward.w_value.weight"),
    ("feed_forward.down_proj.weight", "feed_forward.w_out.weight"),
    ("feed_forward.router.weight", "feed_forward.router.weight"),
    ("feed_forward.shared_expert.gate_proj.weight", "feed_forward.shared_expert.w_gate.weight"),
    ("feed_forward.shared_expert.up_proj.weight", "feed_forward.shared_expert.w_value.weight"),
    ("feed_forward.shared_expert.down_proj.weight", "feed_forward.shared_expert.w_out.weight"),
)
_MLX_STACKED = (  # mlx-lm's SwitchGLU experts: [E, out, in], the canonical layout
    ("feed_forward.experts.gate_proj.weight", "feed_forward.experts.w_gate"),
    ("feed_forward.experts.up_proj.weight", "feed_forward.experts.w_value"),
    ("feed_forward.experts.down_proj.weight", "feed_forward.experts.w_out"),
)


def _split_gate_up(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    shape = shape_of(x)  # [E, D, 2F]: gate is the first half of the last axis, up the second
    if len(shape) != 3 or shape[2] % 2:
        raise CheckpointError(f"{key}: expected [E, D, 2F] with an even last axis, found shape {shape}")
    gate, up = split(x, (shape[2] // 2, shape[2] // 2), 2)
    return gate.swapaxes(1, 2), up.swapaxes(1, 2)  # [E, D, F] -> [E, F, D]


def _swap_experts(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    if len(shape_of(x)) != 3:
        raise CheckpointError(f"{key}: expected a 3-D [E, F, D] tensor, found shape {shape_of(x)}")
    return (x.swapaxes(1, 2),)  # [E, F, D] -> [E, D, F]


def _hf_rules() -> tuple[Rule, ...]:
    layer, ex = _LM + r"model\.layers\.(\d+)\.", "layers.{0}.feed_forward.experts."
    rules = [Rule(_LM + re.escape(hf), (canon,)) for hf, canon in _HF_GLOBAL]
    rules += [Rule(layer + re.escape(hf), ("layers.{0}." + canon,)) for hf, canon in _HF_LAYER + _MLX_STACKED]
    # MLX quantized parts beside each weight: `X.scales` / `X.biases` -> canonical `P.scales` / `P.biases`
    rules += [Rule(_LM + re.escape(hf[: -len("weight")]) + part, (quant_prefix(canon) + "." + part,))
              for hf, canon in _HF_GLOBAL for part in ("scales", "biases")]
    rules += [Rule(layer + re.escape(hf[: -len("weight")]) + part, ("layers.{0}." + quant_prefix(canon) + "." + part,))
              for hf, canon in _HF_LAYER + _MLX_STACKED for part in ("scales", "biases")]
    rules += [
        Rule(layer + r"feed_forward\.experts\.gate_up_proj", (ex + "w_gate", ex + "w_value"), _split_gate_up),
        Rule(layer + r"feed_forward\.experts\.down_proj", (ex + "w_out",), _swap_experts),
        # One [out, in] linear per expert (HF's OFFLINE_QUANT_COMPATIBLE export): stacked by expert index.
        Rule(layer + r"feed_forward\.experts\.(\d+)\.gate_proj\.weight", (ex + "w_gate",), stack_group=1),
        Rule(layer + r"feed_forward\.experts\.(\d+)\.up_proj\.weight", (ex + "w_value",), stack_group=1),
        Rule(layer + r"feed_forward\.experts\.(\d+)\.down_proj\.weight", (ex + "w_out",), stack_group=1),
    ]
    return tuple(rules)


HF_RULES = _hf_rules()
_HF_MARKERS = _LM + r"(?:model|lm_head)\..+|" + HF_VISION


def detect_layout(keys: Iterable[str]) -> Literal["meta", "hf", "canonical"]:
    """Which layout a state dict's keys are in; canonical when neither HF nor Meta-only names appear."""
    keys = list(keys)
    if not keys:
        raise CheckpointError("empty state dict: no keys to detect a layout from")
    hf = [k for k in keys if re.fullmatch(_HF_MARKERS, k)]
    meta = [k for k in keys if re.fullmatch(META_MARKERS, k)]
    if hf and meta:
        raise CheckpointError(f"mixed layouts: HF keys (e.g. {hf[0]}) beside Meta keys (e.g. {meta[0]})")
    return "hf" if hf else "meta" if meta else "canonical"


def hf_to_canonical(sd: Mapping[str, Any], args: ModelArgs) -> LazyDict:
    """HF (CausalLM or ConditionalGeneration) or mlx-lm names -> canonical names, lazily.

    Canonical keys pass through unchanged; vision tensors are mapped when `args` has a vision part,
    else left aside (see `split_vision`). MLX quantized parts (`scales`, `biases`) land beside their
    weights, named as `common.quant` says.
    """
    names = [k for n in canonical_shapes(args) for k in dict.fromkeys((n, *part_names(n)))]
    vision = args.vision_args is not None  # vision tensors are mapped only for a config with a vision part
    thunks = remap(sd, HF_RULES + (HF_VISION_RULES if vision else ()), args, passthrough=names,
                   ignore=r"(?!)" if vision else VISION, layout="hf")
    # A packed expert stack sits beside its scales as `experts.w_gate.weight` (see common.quant).
    return LazyDict({(f"{k}.weight" if re.fullmatch(STACKED, k) and f"{k}.scales" in thunks else k): t
                     for k, t in thunks.items()})


def _fuse_gate_up(sd: Mapping[str, Array], gate: str, value: str) -> Thunk:
    # [E, F, D] -> [E, D, F] each, then [gate | up] along the last axis: [E, D, 2F]
    return lambda: concatenate([sd[gate].swapaxes(1, 2), sd[value].swapaxes(1, 2)], 2)


def _hf_experts(sd: Mapping[str, Array], key: str, base: str, which: str) -> dict[str, Thunk]:
    if which == "w_out":
        return {base + "down_proj": lambda: sd[key].swapaxes(1, 2)}  # [E, D, F] -> [E, F, D]
    gate, value = key[: -len(which)] + "w_gate", key[: -len(which)] + "w_value"
    missing = [k for k in (gate, value) if k not in sd]
    if missing:
        raise CheckpointError(f"{key}: gate_up_proj needs both halves, missing {', '.join(missing)}")
    return {base + "gate_up_proj": _fuse_gate_up(sd, gate, value)} if which == "w_gate" else {}


def canonical_to_hf(sd: Mapping[str, Array], args: ModelArgs, conditional: bool = False,
                    stacked_experts: bool = False) -> LazyDict:
    """Canonical names -> HF names, lazily (the layout `apps.convert` writes).

    `conditional` nests the text model under `language_model.` as Llama4ForConditionalGeneration
    does; `stacked_experts` writes mlx-lm's [E, out, in] `experts.{gate,up,down}_proj.weight`
    instead of HF's fused `gate_up_proj` / `down_proj`. Values are contiguous, ready to write.
    """
    prefix = "language_model." if conditional else ""
    to_global = {canon: hf for hf, canon in _HF_GLOBAL}
    to_layer = {canon: hf for hf, canon in _HF_LAYER + (_MLX_STACKED if stacked_experts else ())}
    thunks: dict[str, Thunk] = {}
    unknown = []
    for key in sd:
        name, part = split_part(key)  # quantized parts take the HF name of their tensor, `weight` -> part
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        experts = re.fullmatch(r"feed_forward\.experts\.(w_gate|w_value|w_out)", m[2]) if m else None
        if name in to_global:
            thunks[_hf_part(prefix + to_global[name], part)] = _getter(sd, key)
        elif m and m[2] in to_layer:
            thunks[_hf_part(f"{prefix}model.layers.{m[1]}.{to_layer[m[2]]}", part)] = _getter(sd, key)
        elif experts and part:
            raise CheckpointError(f"{key}: quantized experts are written as mlx-lm's stacked experts only "
                                  f"(stacked_experts=True), not as HF's fused gate_up_proj")
        elif experts:
            thunks.update(_hf_experts(sd, key, f"{prefix}model.layers.{m[1]}.feed_forward.experts.", experts[1]))
        elif conditional and vision_hf_name(key) is not None:  # vision_model.* sits beside language_model.
            thunks[vision_hf_name(key)] = _getter(sd, key)
        elif not re.fullmatch(VISION, key):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) are not canonical names: " + ", ".join(unknown))
    return LazyDict({name: _contiguous(t) for name, t in thunks.items()})


def _hf_part(hf_name: str, part: str | None) -> str:
    return hf_name if part is None else hf_name[: -len("weight")] + part


def _contiguous(thunk: Thunk) -> Thunk:
    return lambda: contiguous(thunk())


def _getter(sd: Mapping[str, Array], key: str) -> Thunk:
    return lambda: sd[key]


def split_vision(sd: Mapping[str, Any]) -> tuple[LazyDict, LazyDict]:
    """(text, vision) views of a state dict in any layout; no value is read."""
    text = {k: _getter(sd, k) for k in sd if not re.fullmatch(VISION, k)}
    vision = {k: _getter(sd, k) for k in sd if re.fullmatch(VISION, k)}
    return LazyDict(text), LazyDict(vision)


def check_keys(sd: Mapping[str, Any], args: ModelArgs) -> None:
    """Raise unless the text keys of canonical `sd` are exactly those of the model config."""
    expected = dict.fromkeys(expected_names(sd, canonical_shapes(args)))  # quantized tensors: their 3 parts
    keys = [k for k in sd if args.vision_args is not None or not re.fullmatch(VISION, k)]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in keys if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): " + ", ".join(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
    if problems:
        raise CheckpointError("state dict does not match the model config (canonical layout): "
                              + "; ".join(problems))


def checked_items(sd: Mapping[str, Array], args: ModelArgs) -> Iterator[tuple[str, Array]]:
    """(name, array) in canonical order, each checked against its expected shape as it is produced."""
    check_keys(sd, args)
    for name, shape in expected_shapes(sd, canonical_shapes(args)).items():
        x = sd[name]
        if shape_of(x) != shape:
            raise CheckpointError(f"{name}: expected shape {shape}, found {shape_of(x)}")
        yield name, x
