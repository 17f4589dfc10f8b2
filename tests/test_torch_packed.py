"""4-bit and 8-bit folders kept packed in the torch backend (`torch_backend.qweight`, `keep_packed`).

Tolerances, measured (torch 2.13, x86 CPU): the packed kernels take bfloat16 activations and give
bfloat16 outputs, so one product is off the float32 product of the dequantized weights by about
2^-9 of its size (4 bits, where the affine form maps exactly: 3-5e-3 of the largest output
measured); 8 bits adds the re-quantization to one symmetric scale per output row (at most half a
step, max|w| / 254). Through the whole demo model (float32 elsewhere), that is the error of the
bfloat16 model itself: on 96 held-out tokens the largest logit difference from the dequantized
float32 model was 0.11 (4 bits) and 2.33 (8 bits) where the bfloat16 model's was 1.49 and 2.33,
every argmax equal (bfloat16: 99%), the held-out loss within 0.0012 (bfloat16: 0.002). Checked:
no worse than 1.25x the bfloat16 model, the same argmax at 98% of positions or more, the loss
within 0.005, and MLX's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from apps.convert import convert  # noqa: E402
from common.args import QuantizationArgs  # noqa: E402
from common.quant import dequantize, quantize  # noqa: E402
from torch_backend.qweight import QWeight, codes, kernels_available, model_bytes  # noqa: E402

DEMO = Path(__file__).parent.parent / "apps" / "demo_model"
pytestmark = pytest.mark.skipif(not (kernels_available(4, 64) and kernels_available(8, 64)),
                                reason="this torch has no packed CPU kernels")


def _affine(rng: np.random.Generator, shape: tuple[int, ...], bits: int, group: int):
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
    wq, s, b = quantize(w, group, bits, "bfloat16")
    return wq, s, b, dequantize(wq, s, b, group, bits)


def _entries(wq, s, b, bits: int):
    q = codes(torch.from_numpy(wq.view(np.int32)), bits)
    return q, torch.from_numpy(s), torch.from_numpy(b)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_4bit_product_is_the_affine_weight(group: int) -> None:
    rng = np.random.default_rng(0)
    wq, s, b, w = _affine(rng, (96, 256), 4, group)
    packed = QWeight.from_affine([_entries(wq, s, b, 4)], 4, group, stacked=False)
    x = torch.from_numpy(rng.standard_normal((5, 256), dtype=np.float32)).bfloat16().float()
    ref = x @ torch.from_numpy(w).T  # float32 product of the dequantized weight
    err = (packed.mm(x) - ref).abs().max() / ref.abs().max()
    assert err < 8e-3  # bfloat16 output rounding and the zero point in bfloat16
    assert packed.packed.nbytes == 96 * 256 // 2


def test_8bit_requantization_error_is_half_a_step() -> None:
    rng = np.random.default_rng(1)
    wq, s, b, w = _affine(rng, (64, 256), 8, 64)
    packed = QWeight.from_affine([_entries(wq, s, b, 8)], 8, 64, stacked=False)
    back = packed.packed.float() * packed.scales.float()[:, None]  # [N, K]: the weight the kernel multiplies
    row_max = np.abs(w).max(axis=1, keepdims=True)
    # half a step of the row's scale, plus the scale's own bfloat16 rounding (2^-9 of it, 127 steps at most)
    assert (np.abs(back.numpy() - w) <= row_max / 254 + row_max * 2**-8).all()
    x = torch.eye(256)
    np.testing.assert_allclose(packed.mm(x).float().numpy().T, back.bfloat16().float().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_entries(bits: int) -> None:
    rng = np.random.default_rng(2)
    parts = [_affine(rng, (64, 128), bits, 64) for _ in range(3)]
    stack = QWeight.from_affine((_entries(*p[:3], bits) for p in parts), bits, 64, stacked=True)
    x = torch.from_numpy(rng.standard_normal((2, 128), dtype=np.float32)).bfloat16().float()
    for e, p in enumerate(parts):
        alone = QWeight.from_affine([_entries(*p[:3], bits)], bits, 64, stacked=False)
        torch.testing.assert_close(stack.mm(x, e), alone.mm(x), rtol=0, atol=0)


@pytest.fixture(scope="module", params=[4, 8])
def demo_quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    bits = request.param
    return bits, convert(DEMO, tmp_path_factory.mktemp(f"q{bits}") / "out", QuantizationArgs(64, bits))


def _logits(model, tokens: np.ndarray) -> np.ndarray:
    from backends import make

    return make("torch").forward(model, tokens)


def test_demo_packed_matches_dequantized(demo_quantized: tuple[int, Path]) -> None:
    from backends import make
    from test_demo_model import heldout_loss

    from torch_backend import load_model

    _, folder = demo_quantized
    packed = load_model(folder, dtype="float32", device="cpu")
    reference = load_model(folder, dtype="float32", device="cpu", dequantize=True)
    bf16 = load_model(folder, dtype="bfloat16", device="cpu", dequantize=True)  # the error level of bfloat16
    assert packed.layers[0].attention._qkv.quant is not None and packed.output.weight.numel() == 0
    assert packed.layers[1].feed_forward.experts.packed
    assert packed.layers[1].feed_forward.fused_groups()[0].quant is None  # the router stays in float
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int64)[:96].reshape(2, 48)
    want = _logits(reference, tokens)
    got, level = np.abs(_logits(packed, tokens) - want), np.abs(_logits(bf16, tokens) - want)
    assert got.max() <= 1.25 * level.max() and np.percentile(got, 99) <= 1.25 * np.percentile(level, 99)
    assert (_logits(packed, tokens).argmax(-1) == want.argmax(-1)).mean() >= 0.98
    backend = make("torch")
    assert abs(heldout_loss(backend, packed) - heldout_loss(backend, reference)) < 0.005


def test_demo_packed_memory(demo_quantized: tuple[int, Path]) -> None:
    from torch_backend import load_model

    bits, folder = demo_quantized
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    packed = model_bytes(load_model(folder, device="cpu"))
    floats = model_bytes(load_model(folder, device="cpu", dequantize=True))
    # 4 bits: the folder's own bytes (the codes, a bfloat16 scale and zero per group); 8 bits: less
    # (one scale per row instead of a scale and a bias per group).
    assert packed <= stored
    assert packed < floats * {4: 0.3, 8: 0.55}[bits]


def test_demo_packed_greedy_tokens_equal_mlx(demo_quantized: tuple[int, Path]) -> None:
    pytest.importorskip("mlx")
    import mlx_llm
    import torch_backend

    _, folder = demo_quantized
    texts = []
    for module, kwargs in ((mlx_llm, {}), (torch_backend, {"device": "cpu"})):
        model, tok = module.load(folder, **kwargs)
        texts.append(module.generate(model, tok, "def fibonacci(n):", max_tokens=32))
    assert texts[0] == texts[1]


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_folder_loads_packed(tmp_path: Path, bits: int) -> None:
    """mlx-lm's own convert (router quantized too): packed in torch, the router dequantized."""
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert as mlx_lm_convert
    from test_mlx_lm_interop import TOKENS, _hf_source, _our_logits

    from torch_backend import load_model

    out = tmp_path / "mlx-lm"
    mlx_lm_convert(str(_hf_source(tmp_path / "src")), str(out), quantize=True, q_group_size=64, q_bits=bits)
    packed = load_model(out, dtype="float32", device="cpu")
    moe = packed.layers[1].feed_forward
    assert moe.experts.packed and moe.fused_groups()[0].quant is None and moe.router.weight.numel() > 0
    got, mlx = _logits(packed, TOKENS), _our_logits(out)
    want = _logits(load_model(out, dtype="float32", device="cpu", dequantize=True), TOKENS)
    np.testing.assert_allclose(want, mlx, atol=1e-3, rtol=0)
    # A random tiny model: bfloat16 activations move its logits by 1.4-3.4% (test_convert)
    assert np.sqrt(((got - want) ** 2).mean() / (want**2).mean()) < 0.08


@pytest.mark.parametrize("flags", [(), ("--dequantize",)])
def test_generate_cli_runs_packed_and_dequantized(demo_quantized: tuple[int, Path], flags: tuple[str, ...]) -> None:
    import subprocess
    import sys

    _, folder = demo_quantized
    cmd = [sys.executable, "-m", "apps.generate", "--model", str(folder), "--backend", "torch", "--device", "cpu",
           "--prompt", "def add(a, b):", "--max-tokens", "12", *flags]
    r = subprocess.run(cmd, cwd=DEMO.parent.parent, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 5 and "backend: torch" in r.stderr
