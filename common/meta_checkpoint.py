"""Meta native checkpoints (`consolidated.NN.pth`): fused keys and model-parallel shards, both ways.

The released files hold fused tensors (wqkv, fc1), flat 2-D expert tensors and Meta's own names,
split over N tensor-parallel ranks. Each shard is first remapped on its own to canonical names
(so fused tensors are split per shard, where they are [q_r; k_r; v_r]), then the pieces are
concatenated along the axis each tensor was sharded on.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import array_ops as ops
from common.args import ModelArgs
from common.array_ops import Array, CheckpointError, LazyDict, Rule, Thunk
from common.names import canonical_shapes
from common.vision_checkpoint import VISION_SHARD_AXES

META_VISION = r"vision_embeddings\..+|vision_projection\.weight"
# Buffers, router statistics and (FP8) extra state that the model does not use.
META_DROP = (r"rope\.freqs|(?:.+\.)?freqs?_cis|.+\._extra_state|.+_gate_stats_3E|(?:.+\.)?expert_activation_DE")
# Keys that only a Meta native file holds (the unfused Meta names are also canonical ones).
META_MARKERS = (r".+\.wqkv\..+|.+\.feed_forward\.mlp\..+|.+\.router_DE|.+\.experts\.(?:moe_w_\w+|w[123])"
                r"|.+\.feed_forward\.(?:w[123]|shared_expert\.w[123]|\w+_(?:FD|DF))\.weight|" + META_DROP)


def _split_qkv(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    # Rows are [q; k; v] in the ratio H:K:K, both for a whole tensor and for one rank's shard.
    H, K = args.n_heads, args.n_kv_heads
    shape = ops.shape_of(x)
    unit, rest = divmod(shape[0], H + 2 * K)
    if len(shape) != 2 or rest or unit == 0:
        raise CheckpointError(f"{key}: shape {shape} does not split into q, k, v rows in the ratio "
                              f"n_heads:n_kv_heads:n_kv_heads = {H}:{K}:{K}")
    return ops.split(x, (H * unit, K * unit, K * unit), 0)


def _split_halves(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    shape = ops.shape_of(x)  # [2F, D] = [w1; w3]
    if len(shape) != 2 or shape[0] % 2:
        raise CheckpointError(f"{key}: shape {shape} does not split into two halves [w1; w3] along rows")
    return ops.split(x, (shape[0] // 2, shape[0] // 2), 0)


def _transpose(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    if len(ops.shape_of(x)) != 2:
        raise CheckpointError(f"{key}: expected a 2-D [D, E] router, found shape {ops.shape_of(x)}")
    return (x.swapaxes(0, 1),)  # [D, E] -> [E, D]


def _experts(x: Array, key: str, args: ModelArgs, inner: int, first: bool) -> Array:
    """[E*A, B] or [E, A, B] -> [E, A, B], with A = `inner` when `first` else B = `inner`."""
    E, shape = args.num_experts, ops.shape_of(x)
    if E == 0:
        raise CheckpointError(f"{key}: expert tensor, but the model config has no experts")
    if len(shape) == 2 and (shape[0] == E * inner if first else shape[0] % E == 0 and shape[1] == inner):
        x = x.reshape((E, inner, -1) if first else (E, -1, inner))  # [E*A, B] -> [E, A, B]
    shape3 = ops.shape_of(x)
    if len(shape3) != 3 or shape3[0] != E or shape3[1 if first else 2] != inner:
        want = f"[{E}*{inner}, F] or [{E}, {inner}, F]" if first else f"[{E}*F, {inner}] or [{E}, F, {inner}]"
        raise CheckpointError(f"{key}: expected {want} (E={E}, D={inner}), found shape {shape}")
    return x


def _experts_in(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    return (_experts(x, key, args, args.dim, True).swapaxes(1, 2),)  # [E, D, F] -> [E, F, D]


def _experts_out(x: Array, key: str, args: ModelArgs) -> tuple[Array, ...]:
    return (_experts(x, key, args, args.dim, False).swapaxes(1, 2),)  # [E, F, D] -> [E, D, F]


_L = r"layers\.(\d+)\."
_FF = "layers.{0}.feed_forward."
META_RULES = (
    Rule(_L + r"attention\.wqkv\.weight",
         tuple(f"layers.{{0}}.attention.w{c}.weight" for c in "qkv"), _split_qkv),
    Rule(_L + r"attention\.wqkv\.layer_norm_weight", ("layers.{0}.attention_norm.weight",)),
    Rule(_L + r"feed_forward\.mlp\.layer_norm_weight", ("layers.{0}.ffn_norm.weight",)),
    Rule(_L + r"feed_forward\.norm\.weight", ("layers.{0}.ffn_norm.weight",)),
    Rule(_L + r"feed_forward\.mlp\.fc1_weight", (_FF + "w_gate.weight", _FF + "w_value.weight"), _split_halves),
    Rule(_L + r"feed_forward\.(?:mlp\.fc2_weight|w2\.weight)", (_FF + "w_out.weight",)),
    Rule(_L + r"feed_forward\.w1\.weight", (_FF + "w_gate.weight",)),
    Rule(_L + r"feed_forward\.w3\.weight", (_FF + "w_value.weight",)),
    Rule(_L + r"feed_forward\.router_DE", (_FF + "router.weight",), _transpose),
    Rule(_L + r"feed_forward\.(?:w_in_shared_FD|shared_expert\.w1)\.weight", (_FF + "shared_expert.w_gate.weight",)),
    Rule(_L + r"feed_forward\.(?:w_swiglu_FD|shared_expert\.w3)\.weight", (_FF + "shared_expert.w_value.weight",)),
    Rule(_L + r"feed_forward\.(?:w_out_shared_DF|shared_expert\.w2)\.weight", (_FF + "shared_expert.w_out.weight",)),
    Rule(_L + r"feed_forward\.experts\.(?:moe_w_in_eD_F|w1)", (_FF + "experts.w_gate",), _experts_in),
    Rule(_L + r"feed_forward\.experts\.(?:moe_w_swiglu_eD_F|w3)", (_FF + "experts.w_value",), _experts_in),
    Rule(_L + r"feed_forward\.experts\.(?:moe_w_out_eF_D|w2)", (_FF + "experts.w_out",), _experts_out),
)

_REPLICATED = -1
# Canonical name -> the axis model-parallel ranks split it along (fairscale column/row parallel).
SHARD_AXES = (
    (r"tok_embeddings\.weight|output\.weight", 0),
    (r"norm\.weight|layers\.\d+\.(?:attention_norm|ffn_norm|feed_forward\.router)\.weight", _REPLICATED),
    (r"layers\.\d+\.attention\.w[qkv]\.weight", 0),
    (r"layers\.\d+\.attention\.wo\.weight", 1),
    (r"layers\.\d+\.feed_forward\.(?:shared_expert\.)?w_(?:gate|value)\.weight", 0),
    (r"layers\.\d+\.feed_forward\.(?:shared_expert\.)?w_out\.weight", 1),
    (r"layers\.\d+\.feed_forward\.experts\.w_(?:gate|value)", 1),  # [E, F, D]: ranks split F
    (r"layers\.\d+\.feed_forward\.experts\.w_out", 2),  # [E, D, F]: ranks split F
    *VISION_SHARD_AXES,
)


def shard_axis(name: str) -> int | None:
    """The axis model-parallel shards split canonical tensor `name` along; None if replicated."""
    for pattern, axis in SHARD_AXES:
        if re.fullmatch(pattern, name):
            return None if axis == _REPLICATED else axis
    raise CheckpointError(f"{name}: not a canonical text tensor, so its model-parallel layout is unknown")


def _shard_thunks(sd: Mapping[str, Any], args: ModelArgs) -> dict[str, Thunk]:
    return ops.remap(sd, META_RULES, args, passthrough=list(canonical_shapes(args)),
                     ignore=f"{META_DROP}|{META_VISION}", layout="meta")


def meta_to_canonical(sd: Mapping[str, Any], args: ModelArgs) -> LazyDict:
    """One Meta native file (or an already merged one) -> canonical names, lazily."""
    return meta_shards_to_canonical([sd], args)


def meta_shards_to_canonical(shards: Sequence[Mapping[str, Any]], args: ModelArgs) -> LazyDict:
    """N model-parallel shards in rank order -> canonical names; each value is merged on access."""
    if not shards:
        raise CheckpointError("no Meta checkpoint shards given")
    per_shard = [_shard_thunks(sd, args) for sd in shards]
    names = list(per_shard[0])
    for r, thunks in enumerate(per_shard[1:], start=1):
        if set(thunks) != set(names):
            diff = sorted(set(thunks).symmetric_difference(names))
            raise CheckpointError(f"shards 0 and {r} hold different tensors: {', '.join(diff)}")
    if len(shards) == 1:
        return LazyDict(per_shard[0])
    merged = {}
    for name in names:
        axis, pieces = shard_axis(name), [t[name] for t in per_shard]
        merged[name] = pieces[0] if axis is None else _cat_thunk(pieces, axis)
    return LazyDict(merged)


def _cat_thunk(pieces: list[Thunk], axis: int) -> Thunk:
    return lambda: ops.concatenate([p() for p in pieces], axis)


def _chunk(x: Array, name: str, axis: int | None, n: int, r: int) -> Array:
    if axis is None:
        return x
    size, rest = divmod(ops.shape_of(x)[axis], n)
    if rest:
        raise CheckpointError(f"{name}: shape {ops.shape_of(x)} does not split into {n} shards along axis {axis}")
    return ops.take(x, axis, r * size, (r + 1) * size)


def _flat_experts(x: Array) -> Array:
    E, A, B = ops.shape_of(x)  # canonical [E, A, B] -> Meta's flat [E*B, A]
    return x.swapaxes(1, 2).reshape((E * B, A))  # [E, A, B] -> [E, B, A] -> [E*B, A]


_TO_META = {  # canonical suffix under layers.{i}. -> (Meta suffix, transform)
    "attention_norm.weight": ("attention.wqkv.layer_norm_weight", None),
    "attention.wo.weight": ("attention.wo.weight", None),
    "feed_forward.w_out.weight": ("feed_forward.mlp.fc2_weight", None),
    "feed_forward.router.weight": ("feed_forward.router_DE", lambda x: x.swapaxes(0, 1)),  # [E, D] -> [D, E]
    "feed_forward.shared_expert.w_gate.weight": ("feed_forward.w_in_shared_FD.weight", None),
    "feed_forward.shared_expert.w_value.weight": ("feed_forward.w_swiglu_FD.weight", None),
    "feed_forward.shared_expert.w_out.weight": ("feed_forward.w_out_shared_DF.weight", None),
    "feed_forward.experts.w_gate": ("feed_forward.experts.moe_w_in_eD_F", _flat_experts),
    "feed_forward.experts.w_value": ("feed_forward.experts.moe_w_swiglu_eD_F", _flat_experts),
    "feed_forward.experts.w_out": ("feed_forward.experts.moe_w_out_eF_D", _flat_experts),
}
_FUSED = (  # Meta suffix <- canonical suffixes whose rows it stacks, per shard
    ("attention.wqkv.weight", ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")),
    ("feed_forward.mlp.fc1_weight", ("feed_forward.w_gate.weight", "feed_forward.w_value.weight")),
)


def _meta_shard(pieces: dict[str, Array], args: ModelArgs) -> dict[str, Array]:
    """One rank's canonical pieces -> that rank's Meta keys."""
    out: dict[str, Array] = {}
    for name, x in pieces.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            out[name] = x  # tok_embeddings, norm, output keep their names
            continue
        i, suffix = int(m[1]), m[2]
        if suffix == "ffn_norm.weight":
            moe = args.layer_roles[i].moe
            out[f"layers.{i}.feed_forward.{'norm.weight' if moe else 'mlp.layer_norm_weight'}"] = x
        elif suffix in _TO_META:
            meta, fn = _TO_META[suffix]
            out[f"layers.{i}.{meta}"] = x if fn is None else fn(x)
        elif not any(suffix in parts for _, parts in _FUSED):
            raise CheckpointError(f"{name}: no Meta native name for this canonical tensor")
    for i in range(args.n_layers):
        for fused, parts in _FUSED:
            names = [f"layers.{i}.{p}" for p in parts]
            if any(n in pieces for n in names):
                missing = [n for n in names if n not in pieces]
                if missing:
                    raise CheckpointError(f"layers.{i}.{fused} needs {', '.join(missing)}")
                out[f"layers.{i}.{fused}"] = ops.concatenate([pieces[n] for n in names], 0)
    return out


def _extras(shard: dict[str, Array], args: ModelArgs) -> None:
    """Entries real files may carry that the remapping must drop."""
    shard["rope.freqs"] = np.ones(args.head_dim // 2, dtype=np.float32)
    for i, role in enumerate(args.layer_roles):
        shard[f"layers.{i}.attention.wqkv._extra_state"] = io.BytesIO(b"fp8")
        if role.moe:
            E, ff = args.num_experts, f"layers.{i}.feed_forward."
            shard[ff + "global_gate_stats_3E"] = np.zeros((3, E), dtype=np.float32)
            shard[ff + "running_gate_stats_3E"] = np.zeros((3, E), dtype=np.float32)
            shard[ff + "expert_activation_DE"] = np.zeros((args.dim, E), dtype=np.float32)


def canonical_to_meta(sd: Mapping[str, Array], args: ModelArgs, n_shards: int = 1,
                      extras: bool = False) -> list[dict[str, Array]]:
    """Canonical tensors -> `n_shards` dicts in the layout of the released `consolidated.NN.pth`.

    `extras` adds the entries real files may carry and loaders must drop (rope.freqs, router
    statistics, io.BytesIO extra state). Vision tensors are written when `args` has a vision part,
    else left aside. Values are contiguous copies or views, ready to write.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    known = canonical_shapes(args)  # holds the vision tensors when args has a vision part
    text = [n for n in sd if n in known or not re.fullmatch(META_VISION, n)]
    unexpected = [n for n in text if n not in known]
    if unexpected:
        raise CheckpointError("not canonical names of this model config: " + ", ".join(unexpected))
    axes = {n: shard_axis(n) for n in text}
    shards = []
    for r in range(n_shards):
        pieces = {n: _chunk(sd[n], n, axes[n], n_shards, r) for n in text}
        shard = {k: ops.contiguous(v) for k, v in _meta_shard(pieces, args).items()}
        if extras:
            _extras(shard, args)
        shards.append(shard)
    return shards
