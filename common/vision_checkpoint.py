"""Vision tensors in checkpoints: HF <-> canonical names, and how Meta's model-parallel ranks split them.

Canonical vision names are Meta's module names (`vision_embeddings.*`, `vision_projection.weight`),
so a Meta native file needs no renaming, only the merge of its shards. HF's
`Llama4ForConditionalGeneration` holds the same tensors under `vision_model.*` and
`multi_modal_projector.linear_1.weight`, with the same layouts (pure renames).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from common.args import ModelArgs
from common.array_ops import Rule

_HF, _META = "vision_model.", "vision_embeddings."
_BLOCK_HF, _BLOCK_META = "model.layers.{i}.", "vision_encoder.transformer.resblocks.{i}."
# (HF name under vision_model., canonical name under vision_embeddings.); {i} layer, {p} weight|bias
_PAIRS = (
    ("patch_embedding.linear.weight", "vision_encoder.conv1._linear.weight"),
    ("class_embedding", "vision_encoder.class_embedding"),
    ("positional_embedding_vlm", "vision_encoder.positional_embedding_vlm"),
    ("layernorm_pre.{p}", "vision_encoder.ln_pre.{p}"),
    ("layernorm_post.{p}", "vision_encoder.ln_post.{p}"),
    *((_BLOCK_HF + f"self_attn.{c}_proj.{{p}}", _BLOCK_META + f"attn.w{c}.{{p}}") for c in "qkvo"),
    (_BLOCK_HF + "input_layernorm.{p}", _BLOCK_META + "ln_1.{p}"),
    (_BLOCK_HF + "post_attention_layernorm.{p}", _BLOCK_META + "ln_2.{p}"),
    (_BLOCK_HF + "mlp.fc1.{p}", _BLOCK_META + "mlp.c_fc.{p}"),
    (_BLOCK_HF + "mlp.fc2.{p}", _BLOCK_META + "mlp.c_proj.{p}"),
    ("vision_adapter.mlp.fc1.weight", "vision_adapter.mlp.c_fc.weight"),
    ("vision_adapter.mlp.fc2.weight", "vision_adapter.mlp.c_proj.weight"),
)
_PROJECTOR = ("multi_modal_projector.linear_1.weight", "vision_projection.weight")
_FULL_PAIRS = tuple((_HF + hf, _META + meta) for hf, meta in _PAIRS) + (_PROJECTOR,)


def _regex(template: str) -> str:
    return re.escape(template).replace(r"\{i\}", r"(\d+)").replace(r"\{p\}", r"(weight|bias)")


def _format(template: str) -> str:
    return template.replace("{i}", "{0}").replace("{p}", "{1}" if "{i}" in template else "{0}")


HF_VISION_RULES = tuple(Rule(_regex(hf), (_format(canon),)) for hf, canon in _FULL_PAIRS)
_TO_HF = tuple((_regex(canon), _format(hf)) for hf, canon in _FULL_PAIRS)


def vision_hf_name(name: str) -> str | None:
    """The HF name of canonical vision tensor `name`; None when `name` is not one."""
    for pattern, template in _TO_HF:
        m = re.fullmatch(pattern, name)
        if m:
            return template.format(*m.groups())
    return None


_REPLICATED = -1
_ENC = r"vision_embeddings\.vision_encoder\."
_BLOCK = _ENC + r"transformer\.resblocks\.\d+\."
# Canonical vision name -> the axis Meta's ranks split it along (fairscale column/row parallel linears).
VISION_SHARD_AXES = (
    (_ENC + r"conv1\._linear\.weight", 0),
    (_BLOCK + r"attn\.w[qkv]\.(?:weight|bias)", 0),
    (_BLOCK + r"mlp\.c_fc\.(?:weight|bias)", 0),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_fc\.weight", 0),
    (r"vision_projection\.weight", 0),
    (_BLOCK + r"attn\.wo\.weight", 1),
    (_BLOCK + r"mlp\.c_proj\.weight", 1),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_proj\.weight", 1),
    # Row-parallel biases are added after the all-reduce, so every rank holds all of them.
    (_BLOCK + r"(?:attn\.wo|mlp\.c_proj)\.bias", _REPLICATED),
    (_BLOCK + r"ln_[12]\.(?:weight|bias)", _REPLICATED),
    (_ENC + r"(?:ln_pre|ln_post)\.(?:weight|bias)|" + _ENC + r"(?:class_embedding|positional_embedding_vlm)",
     _REPLICATED),
)


def is_vision_name(name: str) -> bool:
    """Whether `name` is a vision tensor in the canonical (= Meta) or HF layout."""
    return name.startswith((_META, _HF, "vision_projection.", "multi_modal_projector."))


def without_absent_vision(args: ModelArgs, names: Iterable[str]) -> ModelArgs:
    """`args` without its vision part when the checkpoint holds no vision tensor at all.

    Text-only conversions (mlx-lm drops the vision tower) keep the vision_config in config.json;
    such a folder loads as the text model. A checkpoint with some vision tensors loads strictly.
    """
    if args.vision_args is None or any(is_vision_name(n) for n in names):
        return args
    return dataclasses.replace(args, vision_args=None, extra={**args.extra, "vision_weights_absent": True})


def no_vision(args: ModelArgs) -> str:
    """Why a model takes no images, for the error a caller raises."""
    if args.extra.get("vision_weights_absent"):
        return ("this model's folder has a vision_config but no vision weights (a text-only export), so it "
                "runs as a text model")
    return "this model's config has no vision part"
