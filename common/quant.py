"""MLX affine quantization: the on-disk format, its canonical names, and a numpy reference.

Format (MLX's `mx.quantize(w, group_size, bits)`, mode "affine", as mlx-lm writes it):
- a weight [..., out, in] is cut along `in` into groups of `group_size` consecutive inputs; each
  group g of a row has a scale s and a bias b, stored in the model's float dtype as `scales` and
  `biases` of shape [..., out, in / group_size];
- each value becomes an integer q in [0, 2**bits - 1] with w ~= s * q + b;
- the q of one row form a little-endian bit stream, value j at stream bits [j*bits, (j+1)*bits),
  stored as uint32 words [..., out, in * bits / 32] (for 4 bits: 8 values per word, value j of a
  word in its bits 4j..4j+3; for 3, 5 and 6 bits values straddle bytes).
Dequantizing computes in the scales' dtype, rounding after the product and after the sum.

Names: a quantized tensor stores three parts under a prefix: `P.weight` (the packed uint32),
`P.scales`, `P.biases`. P is the canonical name without its `.weight` for linears and the
embedding (`layers.0.attention.wq.weight` -> `layers.0.attention.wq`), and the canonical name
itself for expert stacks (`layers.1.feed_forward.experts.w_gate` -> `...experts.w_gate.weight`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from common.args import ModelArgs, QuantizationArgs
from common.array_ops import CheckpointError, shape_of
from common.names import canonical_shapes

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
PARTS = ("weight", "scales", "biases")
_EPS = np.float32(1e-7)  # smallest scale, so constant groups do not divide by zero
STACKED = r"layers\.\d+\.feed_forward\.experts\.w_(?:gate|value|out)"  # canonical expert stacks


def quant_prefix(name: str) -> str:
    """The prefix the parts of quantized canonical tensor `name` are stored under."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def part_names(name: str) -> tuple[str, str, str]:
    """(packed weight, scales, biases) names of quantized canonical tensor `name`."""
    prefix = quant_prefix(name)
    return tuple(f"{prefix}.{part}" for part in PARTS)  # type: ignore[return-value]


def split_part(key: str) -> tuple[str, str | None]:
    """(canonical tensor, part) for a quantized part's key; (key, None) for any other key.

    `layers.0.attention.wq.scales` -> (`layers.0.attention.wq.weight`, "scales");
    `layers.1.feed_forward.experts.w_gate.weight` -> (`layers.1.feed_forward.experts.w_gate`, "weight").
    A linear's packed `.weight` has its tensor's own name, so it comes back as (key, None).
    """
    m = re.fullmatch(rf"({STACKED})\.(weight|scales|biases)", key)
    if m:
        return m[1], m[2]
    m = re.fullmatch(r"(.+)\.(scales|biases)", key)
    return (f"{m[1]}.weight", m[2]) if m else (key, None)


def expected_names(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The names of `shapes`, each tensor that `keys` hold quantized replaced by its three parts."""
    quantized = set(quantized_tensors(keys, shapes))
    return [k for n in shapes for k in (part_names(n) if n in quantized else (n,))]


def quantized_tensors(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The canonical tensors (of `shapes`, at least 2-D) that `keys` hold in quantized form."""
    keys = set(keys)
    return [n for n, s in shapes.items() if len(s) >= 2 and part_names(n)[1] in keys]


def can_quantize(shape: tuple[int, ...], spec: QuantizationArgs) -> bool:
    """Whether a weight of `shape` ([..., out, in]) packs into whole groups and whole words."""
    return len(shape) >= 2 and shape[-1] % spec.group_size == 0 and shape[-1] * spec.bits % 32 == 0


def packed_shapes(shape: tuple[int, ...], spec: QuantizationArgs) -> tuple[tuple[int, ...], ...]:
    """Shapes of (packed weight, scales, biases) for a weight of logical `shape`."""
    *lead, n = shape
    groups = (*lead, n // spec.group_size)
    return (*lead, n * spec.bits // 32), groups, groups


def infer_spec(name: str, shape: tuple[int, ...], parts: tuple[tuple[int, ...], ...]) -> QuantizationArgs:
    """The (bits, group_size) the parts' shapes encode for logical `shape`; raises if they do not fit.

    With the input width known, the packed width gives the bits and the scales' width the group size.
    """
    w, s, b = parts
    n = shape[-1]
    lead_ok = w[:-1] == s[:-1] == tuple(shape[:-1]) and s == b
    bits, group = (w[-1] * 32 // n if n else 0), (n // s[-1] if s and s[-1] else 0)
    if not lead_ok or bits not in BITS or group not in GROUP_SIZES or w[-1] * 32 != n * bits or s[-1] * group != n:
        raise CheckpointError(
            f"{quant_prefix(name)}: quantized parts do not fit the logical shape {shape}: weight {w}, scales {s}, "
            f"biases {b} (expected weight [..., {n} * bits / 32] with bits in {BITS}, scales and biases "
            f"[..., {n} / group_size] with group_size in {GROUP_SIZES})")
    return QuantizationArgs(group_size=group, bits=bits)


def tensor_specs(sd: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, QuantizationArgs]:
    """Canonical name -> spec of every tensor `sd` holds quantized (reads only the parts' shapes)."""
    return {n: infer_spec(n, shapes[n], tuple(shape_of(sd[p]) for p in part_names(n)))
            for n in quantized_tensors(sd, shapes)}


def declared_specs(sd: Mapping[str, Any], args: ModelArgs) -> dict[str, QuantizationArgs]:
    """`tensor_specs` of canonical `sd`, which must come with a declared quantization in the config.

    Each tensor's spec is read from its parts' shapes, as mlx-lm does, so folders quantized with a
    per-layer recipe (a few layers at other bits) load too.
    """
    shapes = canonical_shapes(args)
    require_declared(quantized_tensors(sd, shapes), args)
    return tensor_specs(sd, shapes)


def require_declared(quantized: list[str], args: ModelArgs) -> None:
    """Raise if weights hold `quantized` tensors while the config declares no quantization."""
    if quantized and args.quantization is None:
        raise CheckpointError(f"the weights hold quantized tensors (e.g. {part_names(quantized[0])[1]}) but the "
                              f"config declares no quantization (expected \"quantization\": "
                              f"{{\"group_size\": G, \"bits\": B}} in config.json)")


def expected_shapes(sd: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` with each tensor that `sd` holds quantized replaced by its three parts, in order."""
    specs = tensor_specs(sd, shapes)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name in specs:
            out.update(zip(part_names(name), packed_shapes(shape, specs[name]), strict=True))
        else:
            out[name] = shape
    return out


# --- float rounding (numpy has no bfloat16: its values live in float32, its storage in uint16) ---

def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to the nearest `dtype` value (ties to even), kept in float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return from_bf16_bits(bf16_bits(x))
    raise ValueError(f"unknown float dtype {dtype!r}; expected float32, float16 or bfloat16")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def from_bf16_bits(u: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- packing ---

def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """q [..., n] integers < 2**bits -> uint32 words [..., n * bits / 32] (little-endian bit stream)."""
    if 32 % bits == 0:
        per = 32 // bits
        q = q.astype(np.uint32).reshape(*q.shape[:-1], -1, per)  # [..., words, per]
        return (q << (np.arange(per, dtype=np.uint32) * bits)).sum(-1, dtype=np.uint32)
    stream = (q[..., None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1  # [..., n, bits]
    packed = np.packbits(stream.reshape(*q.shape[:-1], -1), axis=-1, bitorder="little")  # [..., bytes]
    return np.ascontiguousarray(packed).view(np.uint32)


def unpack(wq: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [..., w] -> the integers q [..., w * 32 / bits] as uint32."""
    wq = np.ascontiguousarray(wq, dtype=np.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        q = (wq[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
        return q.reshape(*wq.shape[:-1], -1)  # [..., w, per] -> [..., w * per]
    stream = np.unpackbits(wq.view(np.uint8), axis=-1, bitorder="little")  # [..., w * 32]
    stream = stream.reshape(*wq.shape[:-1], -1, bits).astype(np.uint32)  # [..., n, bits]
    return (stream << np.arange(bits, dtype=np.uint32)).sum(-1, dtype=np.uint32)


# --- reference quantize / dequantize ---

def quantize(w: np.ndarray, group_size: int, bits: int, dtype: str = "float32"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32, scales, biases) of w [..., out, in], as `mx.quantize` computes them.

    Works in float32; scales and biases come back as float32 holding `dtype` values (the dtype
    they are stored in). As in MLX, q is computed with the unrounded float32 scale.
    """
    spec = QuantizationArgs(group_size=group_size, bits=bits)
    if not can_quantize(shape_of(w), spec):
        raise ValueError(f"cannot quantize shape {shape_of(w)} with group_size {group_size}, bits {bits}")
    g = np.asarray(w, dtype=np.float32).reshape(*w.shape[:-1], -1, group_size)  # [..., groups, G]
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
    # Anchor the grid at the extreme of larger magnitude so that value is represented exactly.
    low_anchor = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    scale = np.where(low_anchor, scale, -scale)
    edge = np.where(low_anchor, w_min, w_max)
    q0 = np.rint(edge / scale)
    nonzero = q0 != 0
    scale = np.where(nonzero, edge / np.where(nonzero, q0, np.float32(1)), scale)
    bias = np.where(nonzero, edge, np.float32(0))
    q = np.clip(np.rint((g - bias) / scale), 0, n_bins).astype(np.uint32).reshape(w.shape)
    return _pack(q, bits), round_to(scale[..., 0], dtype), round_to(bias[..., 0], dtype)


def dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int,
               dtype: str | None = None) -> np.ndarray:
    """float32 weights [..., out, in] from the packed parts, bit for bit as `mx.dequantize`.

    `dtype` is the dtype the scales are stored in (default: that of `scales`; pass "bfloat16" for
    bfloat16 scales given as float32); the product and the sum are rounded to it, as MLX does.
    """
    dtype = dtype or str(np.asarray(scales).dtype)
    q = unpack(wq, bits).astype(np.float32)
    q = q.reshape(*q.shape[:-1], -1, group_size)  # [..., groups, G]
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    if q.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"dequantize: packed weight {shape_of(wq)} holds {q.shape[-2]} groups of {group_size} "
                         f"per row, scales have {s.shape[-2]}")
    w = round_to(round_to(s * q, dtype) + b, dtype)
    return w.reshape(*w.shape[:-2], -1)  # [..., groups, G] -> [..., in]
