"""`python -m apps.convert`: layout of the output, quantized logits on both backends, sources read without
torch, safe output (refusal, interruption), and the demo model's held-out loss in 4 and 8 bits.

Tolerances for quantized vs float logits (relative RMS error over all logits): these tiny models have
random Gaussian weights, whose quantization noise is step / sqrt(12) ~ 9% of their spread at 4 bits
and ~0.5% at 8 bits, summed over ~28 matmuls on each token's path. Measured on 3 seeds x group sizes
32/64: 8 bits 0.020-0.045, 4 bits 0.31-0.45, the ratio tracking the 17x finer 8-bit grid. Exactness
is checked separately: MLX's quantized kernels against a float model holding the dequantized
weights (1e-4), and torch's load-time dequantization against MLX (1e-3 asked, ~1e-5 measured).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from folders import meta_args, write_hf, write_meta
from test_quantize import quantized_canonical
from tiny import random_weights, tiny_args

from apps import convert_plan
from apps.convert import convert, main
from apps.convert_io import PthSource, read_header
from common import quant
from common.args import QuantizationArgs

pytest.importorskip("mlx.core")
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 40))
QARGS = tiny_args(dim=128, head_dim=32, ffn_hidden_dim=256, moe_hidden_dim=128, vocab_size=256)  # all divide 128
REL_TOL = {8: 0.08, 4: 0.6}


def _mlx():
    from backends import MlxBackend

    return MlxBackend()


def _logits(path: Path, backend: str, dtype: str | None = None, dequantize: bool = True) -> np.ndarray:
    from backends import make

    if backend == "mlx":
        from mlx_llm import load_model

        return make("mlx").forward(load_model(path, dtype=dtype), TOKENS)
    from torch_backend import load_model

    return make("torch").forward(load_model(path, dtype=dtype, device="cpu", dequantize=dequantize), TOKENS)


def _tensors(folder: Path) -> dict[str, dict]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(read_header(folder / name)[1])
    assert set(out) == set(index["weight_map"])
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


def _check_quantized(dst: Path, args, weights: dict[str, np.ndarray], spec: QuantizationArgs) -> None:
    """Layout, config, MLX vs the float model and vs the dequantized weights, torch vs MLX."""
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama4" and config["quantization"] == {"group_size": spec.group_size,
                                                                          "bits": spec.bits}
    tensors = _tensors(dst)
    want = {k: v for k, v in quantized_canonical(args, weights, spec).items()}
    from common.checkpoint import canonical_to_hf

    hf = canonical_to_hf(want, args, conditional=True, stacked_experts=True)
    assert set(tensors) == set(hf)  # names, in the mlx-lm layout
    for name, entry in tensors.items():
        x = hf[name]
        assert tuple(entry["shape"]) == x.shape, name
        assert entry["dtype"] == ("U32" if x.dtype == np.uint32 else "F32"), name
    assert "language_model.model.layers.1.feed_forward.router.weight" in tensors  # router kept in float
    assert "language_model.model.layers.1.feed_forward.router.scales" not in tensors

    mlx = _logits(dst, "mlx")
    float_logits = _mlx().forward(_mlx().build(args, weights), TOKENS)
    assert _rel(mlx, float_logits) < REL_TOL[spec.bits]
    deq = {n: quant.dequantize(*(want[p] for p in quant.part_names(n)), spec.group_size, spec.bits)
           if quant.part_names(n)[1] in want else weights[n] for n in weights}
    np.testing.assert_allclose(mlx, _mlx().forward(_mlx().build(args, deq), TOKENS), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_logits(dst, "torch"), mlx, atol=1e-3, rtol=0)
    # Kept packed, torch's integer kernels take bfloat16 activations: bfloat16's own error level (below).
    assert _rel(_logits(dst, "torch", dequantize=False), mlx) < 0.08


@pytest.mark.parametrize("bits", [4, 8])
def test_hf_quantized(tmp_path: Path, bits: int) -> None:
    weights = random_weights(QARGS, seed=11)
    src = write_hf(tmp_path / "src", QARGS, weights)
    (src / "tokenizer.model").write_bytes(b"sp")
    spec = QuantizationArgs(group_size=64, bits=bits)
    dst = convert(src, tmp_path / "out", spec)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.model"]
    _check_quantized(dst, QARGS, weights, spec)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 64)])
def test_meta_two_shards_quantized(tmp_path: Path, bits: int, group: int) -> None:
    """Meta's tiny widths (experts 48, dense 176) leave each w_out in float: mixed stacks in one MoE."""
    args, weights = meta_args(), random_weights(meta_args(), seed=12)
    src = write_meta(tmp_path / "src", weights, shards=2)
    spec = QuantizationArgs(group_size=group, bits=bits)
    dst = convert(src, tmp_path / "out", spec)
    tensors = _tensors(dst)
    assert "language_model.model.layers.1.feed_forward.experts.gate_proj.scales" in tensors
    assert "language_model.model.layers.1.feed_forward.experts.down_proj.scales" not in tensors
    assert json.loads((dst / "config.json").read_text())["text_config"]["hidden_size"] == 64
    _check_quantized(dst, args, weights, spec)


def test_dtype_only(tmp_path: Path) -> None:
    weights = random_weights(QARGS, seed=13)
    src = write_hf(tmp_path / "src", QARGS, weights, shards=2)
    dst = convert(src, tmp_path / "out", dtype="float16")
    assert {e["dtype"] for e in _tensors(dst).values()} == {"F16"}
    assert "quantization" not in json.loads((dst / "config.json").read_text())
    for backend in ("mlx", "torch"):  # the same float16 numbers as casting the source on load
        np.testing.assert_array_equal(_logits(dst, backend), _logits(src, backend, "float16"))


def test_bfloat16_quantized_runs_on_both_backends(tmp_path: Path) -> None:
    weights = random_weights(QARGS, seed=14)
    src = convert(write_hf(tmp_path / "src", QARGS, weights), tmp_path / "bf16", dtype="bfloat16")
    dst = convert(src, tmp_path / "out", QuantizationArgs(64, 8))  # a bfloat16 source, read as uint16 bits
    tensors = _tensors(dst)
    assert tensors["language_model.model.layers.0.self_attn.q_proj.scales"]["dtype"] == "BF16"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # bfloat16 rounding alone moves these logits by 1.4-3.4% (unquantized, torch vs MLX, 3 seeds);
    # quantized: 1.9-3.7% (MLX bfloat16 vs float32), 2.3-4.3% (torch vs MLX).
    mlx, torch_logits = _logits(dst, "mlx"), _logits(dst, "torch")
    assert _rel(mlx, _logits(dst, "mlx", "float32")) < 0.08
    assert _rel(torch_logits, mlx) < 0.08


def test_shards_and_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_plan, "MAX_SHARD_BYTES", 100_000)
    weights = random_weights(QARGS, seed=15)
    dst = convert(write_hf(tmp_path / "src", QARGS, weights), tmp_path / "out", QuantizationArgs(64, 4))
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(files) > 3 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    for f in files:  # each within the limit, unless one tensor's group alone exceeds it
        entries = read_header(dst / f)[1].values()
        assert max(e["data_offsets"][1] for e in entries) <= 100_000 or len(entries) <= 3, f
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        np.prod(e["shape"]) * {"U32": 4, "F32": 4}[e["dtype"]] for e in _tensors(dst).values())
    np.testing.assert_allclose(_logits(dst, "torch"), _logits(dst, "mlx"), atol=1e-3, rtol=0)


def test_pth_source_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import io

    sd = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "t": torch.randn(4, 6).t(), "view": torch.arange(10.0)[2:7],
          "half": torch.randn(2, 3, 4).half(), "extra": io.BytesIO(b"fp8")}
    torch.save(sd, tmp_path / "x.pth")
    src = PthSource(tmp_path / "x.pth")
    assert list(src) == list(sd)
    np.testing.assert_array_equal(quant.from_bf16_bits(src["bf16"]), sd["bf16"].float().numpy())
    for k in ("t", "view", "half"):
        np.testing.assert_array_equal(src[k], sd[k].numpy())
    assert src["extra"].getvalue() == b"fp8"
    torch.save({"bad": torch.nn.Linear(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: cannot read checkpoint.*refusing to unpickle torch.nn"):
        PthSource(tmp_path / "bad.pth")


def test_refuses_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_hf(tmp_path / "src", QARGS, random_weights(QARGS, seed=16))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["--model", str(src), "--out", str(tmp_path / "out"), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["--model", str(src), "--out", str(tmp_path / "out"), "-q", "--q-bits", "8", "--force"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no leftovers
    with pytest.raises(SystemExit) as usage:
        main(["--model", str(src), "--out", str(tmp_path / "x"), "--q-bits", "3"])
    assert usage.value.code == 2
    assert main(["--model", str(tmp_path / "out"), "--out", str(tmp_path / "again")]) == 1  # already quantized


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_convert_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    src = write_hf(tmp_path / "src", QARGS, random_weights(QARGS, seed=17))
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 10:  # mid-way: some tensors are written, most are not
            raise error("disk full")
        return real(*a, **k)

    real = convert_plan.quantize
    monkeypatch.setattr(convert_plan, "quantize", failing)
    with pytest.raises(error):
        convert(src, tmp_path / "out", QuantizationArgs(64, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (tmp_path / "out").mkdir()  # with --force, a failure keeps the old output as it was
    (tmp_path / "out" / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(error):
        convert(src, tmp_path / "out", QuantizationArgs(64, 4), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


DEMO = Path(__file__).parent.parent / "apps" / "demo_model"
# Nats over the float16 model's held-out loss (1024-token slice, 1.5571). Measured, group size 64:
# 8-bit +0.0002, 4-bit +0.028 (group 32: +0.0004 / +0.024; group 128: -0.0009 / +0.059).
DEMO_MARGIN = {8: 0.005, 4: 0.06}


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="apps/demo_model is not built")
@pytest.mark.parametrize("bits", [8, 4])
def test_demo_model_heldout_loss(tmp_path: Path, bits: int) -> None:
    import mlx.core as mx

    from common.datatypes import TransformerInput
    from mlx_llm import load_model

    dst = convert(DEMO, tmp_path / f"demo-{bits}bit", QuantizationArgs(64, bits))
    model = load_model(dst, dtype="float32")
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int32)
    windows = tokens[: len(tokens) // 256 * 256].reshape(-1, 256)  # the demo's SEQ_LEN windows
    logits = model(TransformerInput(tokens=mx.array(windows[:, :-1]), tokens_position=0)).logits
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    loss = -float(mx.take_along_axis(logp, mx.array(windows[:, 1:, None]), axis=-1).mean())
    recorded = json.loads((DEMO / "eval.json").read_text())["heldout_loss_eval_slice"]
    assert math.isfinite(loss) and loss - recorded < DEMO_MARGIN[bits], (loss, recorded)
    shutil.rmtree(dst)
