"""MLX affine quantization: the numpy reference against MLX bit for bit, the packing layout, quantized
names in the checkpoint remapping, and quantized layers in both backends (native in MLX, dequantized
at load in torch)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import random_weights, tiny_args

from common import quant
from common.args import QuantizationArgs
from common.checkpoint import CheckpointError, canonical_to_hf, check_keys, checked_items, hf_to_canonical
from common.names import canonical_shapes

FLOATS = ["float32", "float16", "bfloat16"]


def _weights(rng: np.random.Generator, shape: tuple[int, ...], group: int) -> np.ndarray:
    """Gaussian rows of varied scale, with the first groups constant, zero, all positive, all negative."""
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, (*shape[:-1], 1))).astype(np.float32)
    rows = w.reshape(-1, shape[-1])
    rows[0, :group], rows[1, :group] = 0.37, 0.0
    rows[2, :group], rows[3, :group] = np.abs(rows[2, :group]), -np.abs(rows[3, :group])
    return w


@pytest.fixture(scope="module")
def mx():
    return pytest.importorskip("mlx.core")


def _np(mx, x) -> np.ndarray:
    return np.array(x.astype(mx.float32)) if x.dtype != mx.uint32 else np.array(x)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_reference_matches_mlx_bit_for_bit(mx, bits: int, group: int, dtype: str) -> None:
    rng = np.random.default_rng(bits * 1000 + group)
    w = mx.array(_weights(rng, (2, 8, 256), group)).astype(getattr(mx, dtype))  # an expert stack [E, out, in]
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    ref_q, ref_s, ref_b = quant.quantize(_np(mx, w), group, bits, dtype)
    np.testing.assert_array_equal(ref_q, _np(mx, wq))
    np.testing.assert_array_equal(ref_s, _np(mx, scales))
    np.testing.assert_array_equal(ref_b, _np(mx, biases))
    got = quant.dequantize(_np(mx, wq), _np(mx, scales), _np(mx, biases), group, bits, dtype)
    want = _np(mx, mx.dequantize(wq, scales, biases, group_size=group, bits=bits))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit, signs of zero too


def test_packing_layout() -> None:
    """4 bits: value j of a word in bits 4j..4j+3; 8 bits: byte j; 3 bits: a little-endian bit stream."""
    q = np.arange(32, dtype=np.uint32) % 16
    words = quant._pack(q[None], 4)[0]
    assert [hex(x) for x in words] == ["0x76543210", "0xfedcba98"] * 2
    assert [hex(x) for x in quant._pack(np.arange(32, dtype=np.uint32)[None], 8)[0][:2]] == ["0x3020100", "0x7060504"]
    three = quant._pack(np.array([[1, 2, 3, 4, 5, 6, 7, 0] * 4], dtype=np.uint32), 3)
    assert int(three[0, 0]) & 0xFFFFFF == 1 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12 | 6 << 15 | 7 << 18
    for bits in quant.BITS:
        vals = np.random.default_rng(bits).integers(0, 1 << bits, (3, 128)).astype(np.uint32)
        np.testing.assert_array_equal(quant.unpack(quant._pack(vals, bits), bits), vals)


def test_bf16_rounding_and_shapes() -> None:
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, np.inf], dtype=np.float32)
    np.testing.assert_array_equal(quant.round_to(x, "bfloat16"), [1.0, 1.0, 1 + 2**-6, -2.5, np.inf])  # ties to even
    assert np.isnan(quant.from_bf16_bits(quant.bf16_bits(np.array([np.nan], np.float32))))[0]
    spec = QuantizationArgs(group_size=64, bits=4)
    assert quant.packed_shapes((16, 96, 128), spec) == ((16, 96, 16), (16, 96, 2), (16, 96, 2))
    assert quant.can_quantize((8, 128), spec) and not quant.can_quantize((8, 96), spec)
    assert not quant.can_quantize((128,), spec)


def test_infer_spec() -> None:
    assert quant.infer_spec("w.weight", (8, 256), ((8, 64), (8, 4), (8, 4))) == QuantizationArgs(64, 8)
    assert quant.infer_spec("e", (4, 8, 256), ((4, 8, 32), (4, 8, 2), (4, 8, 2))) == QuantizationArgs(128, 4)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq: .*scales \(8, 3\)"):
        quant.infer_spec("layers.0.attention.wq.weight", (8, 256), ((8, 32), (8, 3), (8, 3)))
    with pytest.raises(CheckpointError, match="w: quantized parts"):
        quant.infer_spec("w.weight", (8, 256), ((8, 32), (8, 4), (8, 2)))  # biases do not match scales


def test_names() -> None:
    assert quant.part_names("layers.0.attention.wq.weight") == (
        "layers.0.attention.wq.weight", "layers.0.attention.wq.scales", "layers.0.attention.wq.biases")
    assert quant.part_names("layers.1.feed_forward.experts.w_gate") == tuple(
        f"layers.1.feed_forward.experts.w_gate.{p}" for p in ("weight", "scales", "biases"))
    assert quant.split_part("layers.1.feed_forward.experts.w_out.weight") == (
        "layers.1.feed_forward.experts.w_out", "weight")
    assert quant.split_part("tok_embeddings.biases") == ("tok_embeddings.weight", "biases")
    assert quant.split_part("layers.0.attention.wq.weight") == ("layers.0.attention.wq.weight", None)


def quantized_canonical(args, weights: dict[str, np.ndarray], spec: QuantizationArgs,
                        skip: tuple[str, ...] = ("router",)) -> dict[str, np.ndarray]:
    """Canonical weights with every quantizable tensor (router aside) replaced by its parts."""
    out = {}
    for name, w in weights.items():
        if w.ndim >= 2 and quant.can_quantize(w.shape, spec) and not any(s in name for s in skip):
            out.update(zip(quant.part_names(name), quant.quantize(w, spec.group_size, spec.bits), strict=True))
        else:
            out[name] = w
    return out


ARGS = tiny_args()  # D=64, experts F=48, dense F=96: group 32 leaves the expert w_out (in=48) unquantized
SPEC = QuantizationArgs(group_size=32, bits=4)


def test_quantized_names_round_trip() -> None:
    sd = quantized_canonical(ARGS, random_weights(ARGS, seed=5), SPEC)
    assert "layers.1.feed_forward.experts.w_gate.weight" in sd and "layers.1.feed_forward.experts.w_out" in sd
    hf = dict(canonical_to_hf(sd, ARGS, conditional=True, stacked_experts=True))
    for key in ("language_model.model.layers.1.feed_forward.experts.gate_proj.scales",
                "language_model.model.layers.1.feed_forward.experts.down_proj.weight",
                "language_model.lm_head.biases", "language_model.model.embed_tokens.scales",
                "language_model.model.layers.0.self_attn.q_proj.biases"):
        assert key in hf, key
    assert "language_model.model.layers.1.feed_forward.experts.down_proj.scales" not in hf
    back = dict(hf_to_canonical(hf, ARGS))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    assert sorted(hf_to_canonical(sd, ARGS)) == sorted(sd)  # canonical names pass through
    assert [n for n, _ in checked_items(back, ARGS)] == quant.expected_names(back, canonical_shapes(ARGS))
    with pytest.raises(CheckpointError, match="stacked experts only"):
        canonical_to_hf(sd, ARGS)  # HF's fused gate_up_proj cannot hold a quantized stack


def test_quantized_key_errors() -> None:
    sd = quantized_canonical(ARGS, random_weights(ARGS, seed=6), SPEC)
    del sd["layers.2.attention.wk.biases"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): layers\.2\.attention\.wk\.biases"):
        check_keys(sd, ARGS)
    sd = quantized_canonical(ARGS, random_weights(ARGS, seed=6), SPEC)
    sd["layers.0.attention_norm.scales"] = np.ones((1,), np.float32)  # norms have no quantized form
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): layers\.0\.attention_norm\.scales"):
        check_keys(sd, ARGS)
    sd = quantized_canonical(ARGS, random_weights(ARGS, seed=6), SPEC)
    sd["output.scales"] = sd["output.scales"][:, :1]
    with pytest.raises(CheckpointError, match="output: quantized parts do not fit"):
        list(checked_items(sd, ARGS))
    with pytest.raises(CheckpointError, match="declares no quantization"):
        quant.declared_specs(sd, ARGS)


def test_torch_dequantize_matches_reference() -> None:
    torch = pytest.importorskip("torch")
    from torch_backend.quantize import dequantize

    rng = np.random.default_rng(7)
    for bits in (3, 4, 8):
        w = _weights(rng, (3, 16, 256), 64)
        q, s, b = quant.quantize(w, 64, bits)
        got = dequantize(torch.from_numpy(q.view(np.int32)).view(torch.uint32), torch.from_numpy(s),
                         torch.from_numpy(b), QuantizationArgs(64, bits), torch.float32)
        np.testing.assert_array_equal(got.numpy(), quant.dequantize(q, s, b, 64, bits))
