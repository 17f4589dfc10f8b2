"""4-bit and 8-bit folders kept packed in the torch backend (`torch_backend.qweight`, `keep_packed`).

Two CPU layouts. "native" (the project's kernels, `torch_backend.cpu_kernels`, the default where they
build): MLX's codes with its per-group scales and biases, products in float32 as MLX computes them, so
a product is the dequantized weight's float32 product up to summation order (1e-6 of the largest
output measured), and products of many rows run the float32 GEMM on the dequantized weight. "torch"
(torch's packed kernels, where the project's did not build): bfloat16 activations and outputs, so one
product is off the float32 product by about 2^-9 of its size (4 bits, where the affine form maps
exactly: 3-5e-3 of the largest output measured); 8 bits adds the re-quantization to one symmetric
scale per output row (at most half a step, max|w| / 254). Through the whole demo model (float32
elsewhere) the torch layout's error is that of the bfloat16 model itself: on 96 held-out tokens the
largest logit difference from the dequantized float32 model was 0.11 (4 bits) and 2.33 (8 bits) where
the bfloat16 model's was 1.49 and 2.33, every argmax equal (bfloat16: 99%), the held-out loss within
0.0012 (bfloat16: 0.002). Checked for the default layout: no worse than 1.25x the bfloat16 model, the
same argmax at 98% of positions or more, the loss within 0.005, and MLX's greedy tokens. On CUDA
(skipped without one) the same bounds hold against the dequantized model on that GPU, and its greedy
tokens equal the CPU kernels'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from apps.convert import convert  # noqa: E402
from common.args import QuantizationArgs  # noqa: E402
from common.quant import dequantize, quantize  # noqa: E402
from torch_backend import cpu_kernels  # noqa: E402
from torch_backend.qweight import QWeight, _probe, codes, fits, kernels_available, model_bytes  # noqa: E402

DEMO = Path(__file__).parent.parent / "apps" / "demo_model"
pytestmark = pytest.mark.skipif(not (kernels_available(4, 64) and kernels_available(8, 64)),
                                reason="this torch has no packed CPU kernels")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_kernel(bits: int) -> bool:
    """Whether CUDA has the kernel; CUDA's int4 kernel must be there from compute capability 8.0 on."""
    found = kernels_available(bits, 64, "cuda")
    if bits == 4 and torch.cuda.get_device_capability() >= (8, 0):
        assert found
    return found


def _affine(rng: np.random.Generator, shape: tuple[int, ...], bits: int, group: int):
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
    wq, s, b = quantize(w, group, bits, "bfloat16")
    return wq, s, b, dequantize(wq, s, b, group, bits)


def _entries(wq, s, b, bits: int):
    q = codes(torch.from_numpy(wq.view(np.int32)), bits)
    return q, torch.from_numpy(s), torch.from_numpy(b)


LAYOUTS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not cpu_kernels.available(),
                                                                    reason="the CPU kernels did not build"))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_4bit_product_is_the_affine_weight(group: int, layout: str) -> None:
    rng = np.random.default_rng(0)
    wq, s, b, w = _affine(rng, (96, 256), 4, group)
    packed = QWeight.from_affine([_entries(wq, s, b, 4)], 4, group, stacked=False, layout=layout)
    assert packed.layout == layout
    x = torch.from_numpy(rng.standard_normal((5, 256), dtype=np.float32)).bfloat16().float()
    ref = x @ torch.from_numpy(w).T  # float32 product of the dequantized weight
    err = (packed.mm(x) - ref).abs().max() / ref.abs().max()
    # torch: bfloat16 output rounding and the zero point in bfloat16; native: float32 throughout
    assert err < (8e-3 if layout == "torch" else 1e-6)
    assert packed.packed.nbytes == 96 * 256 // 2


@pytest.mark.parametrize("bits", [4, 8])
def test_native_products_are_mlx_affine_math(bits: int) -> None:
    """The CPU kernels: float32, bfloat16 and float16 inputs, 1-13 rows (a row: the quantized blocks; from
    3 / 6 rows on: dequantized blocks, 13 = two passes of 6 and one row), an output count off the kernel's
    blocks of 4 rows, float32 / bfloat16 scales: MLX's affine product (float32 math) up to float32
    summation order, then the input dtype's rounding; entries of a stack read in place."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    rng = np.random.default_rng(7)
    wq, s, b, w = _affine(rng, (2, 37, 192), bits, 64)  # N = 37: nine blocks of 4 and one row
    for scale_dtype in (torch.bfloat16, torch.float32):
        entries = [(q, sc.to(scale_dtype), bi.to(scale_dtype)) for q, sc, bi in
                   (_entries(wq[i], s[i], b[i], bits) for i in range(2))]
        stack = QWeight.from_affine(entries, bits, 64, stacked=True, layout="native")
        assert stack.packed.shape == (2, 37, 192 * bits // 8) and stack.scales.dtype == scale_dtype
        for rows in (1, 3, 8, 13):
            x = torch.from_numpy(rng.standard_normal((rows, 192), dtype=np.float32))
            for e in range(2):
                wf = entries[e][1].float().repeat_interleave(64, 1) * entries[e][0] \
                    + entries[e][2].float().repeat_interleave(64, 1)  # [N, K]
                ref = x.double() @ wf.double().T
                got = stack.mm(x, e)
                assert got.dtype == torch.float32
                assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
                for dt in (torch.bfloat16, torch.float16):
                    low = stack.mm(x.to(dt), e)
                    ref_low = (x.to(dt).double() @ wf.double().T).to(dt)
                    assert low.dtype == dt and torch.equal(low, ref_low) or \
                        (low.float() - ref_low.float()).abs().max() <= 2**-7 * ref.abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_native_prefill_product_is_the_dequantized_weights_gemm(bits: int) -> None:
    """Products of many rows (`cpu_kernels.quant_mm`, the weight dequantized about 1 MB at a time: here
    2,100 rows of 256 inputs in three tiles, the last one short): MLX's float32 weight, q * s + b as one
    fused operation, exactly as `dequantize` makes it, through the float32 GEMM."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    rng = np.random.default_rng(9)
    wq, s, b, _ = _affine(rng, (2100, 256), bits, 64)
    q, sc, bi = _entries(wq, s, b, bits)
    packed = QWeight.from_affine([(q, sc, bi)], bits, 64, stacked=False, layout="native")
    w = cpu_kernels.dequantize(packed.packed, packed.scales, bits, 64)
    scale, bias = (t.double().repeat_interleave(64, 1).numpy() for t in (sc, bi))
    fused = torch.from_numpy(np.float32(q.double().numpy() * scale + bias))
    assert torch.equal(w, fused)  # one rounding of the exact q * s + b (s, b and q are exact in float32)
    x = torch.from_numpy(rng.standard_normal((40, 256), dtype=np.float32))
    got = packed.mm(x)
    ref = x.double() @ w.double().T
    assert got.dtype == torch.float32 and (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(got, x @ w.T, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert packed.mm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_gemv_is_the_float32_product(dtype: torch.dtype) -> None:
    """bfloat16 / float16 weights through the CPU kernel: the float32 product of the same numbers, rounded
    once to the dtype; strided rows (a fused storage's slice) and every row count up to MAX_ROWS."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    gen = torch.Generator().manual_seed(3)
    storage = torch.randn((45, 160), generator=gen).to(dtype)
    w = storage[2:39, :144]  # [37, 144], rows 160 apart
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        x = torch.randn((rows, 144), generator=gen).to(dtype)
        ref = x.double() @ w.double().T
        got = cpu_kernels.reduced_gemv(x, w)
        assert got.dtype == dtype and got.shape == (rows, 37)
        # one rounding of a float32 sum: within half a step of the dtype, plus float32 summation order
        step = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
        assert ((got.double() - ref).abs() <= step * ref.abs() + 1e-5 * ref.abs().max()).all()
    assert cpu_kernels.reduced_fits(x, w) is not torch.is_grad_enabled()


def test_8bit_requantization_error_is_half_a_step() -> None:
    rng = np.random.default_rng(1)
    wq, s, b, w = _affine(rng, (64, 256), 8, 64)
    packed = QWeight.from_affine([_entries(wq, s, b, 8)], 8, 64, stacked=False, layout="torch")
    back = packed.packed.float() * packed.scales.float()[:, None]  # [N, K]: the weight the kernel multiplies
    row_max = np.abs(w).max(axis=1, keepdims=True)
    # half a step of the row's scale, plus the scale's own bfloat16 rounding (2^-9 of it, 127 steps at most)
    assert (np.abs(back.numpy() - w) <= row_max / 254 + row_max * 2**-8).all()
    x = torch.eye(256)
    np.testing.assert_allclose(packed.mm(x).float().numpy().T, back.bfloat16().float().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("bits", "group"), [(8, 64), (4, 32), (4, 64), (4, 128)])
def test_prefill_gemm_equals_the_kernel(bits: int, group: int, layout: str) -> None:
    """From INT8_GEMM_ROWS / INT4_GEMM_ROWS rows on (native: past cpu_kernels.MAX_ROWS), products widen
    or unpack the codes into bfloat16 and run the GEMM: the kernel's numbers up to bfloat16 rounding (of
    the output; 4 bits and native: also of the unpacked weight, one step of 2^-8 of the largest weight)."""
    from torch_backend.qweight import INT4_GEMM_ROWS, INT8_GEMM_ROWS, _cpu_layout_known

    assert _cpu_layout_known()  # this torch packs int4 as the unpacking expects
    rng = np.random.default_rng(4)
    wq, s, b, w = _affine(rng, (192, 256), bits, group)
    packed = QWeight.from_affine([_entries(wq, s, b, bits)], bits, group, stacked=False, layout=layout)
    m = (INT8_GEMM_ROWS if bits == 8 else INT4_GEMM_ROWS) + 8 if layout == "torch" else cpu_kernels.QUANT_MAX_ROWS + 8
    x = torch.from_numpy(rng.standard_normal((m, 256), dtype=np.float32)).bfloat16().float()
    rows = torch.cat([packed.mm(x[i : i + 1]) for i in range(m)])  # the kernel, one row at a time
    gemm = packed.mm(x)
    err = (gemm - rows).abs().max() / rows.abs().max()
    assert 0 < err <= (2**-7 if bits == 8 and layout == "torch" else 2**-6)
    ref = x @ torch.from_numpy(w).T
    assert (gemm - ref).abs().max() / ref.abs().max() < 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_entries(bits: int, layout: str) -> None:
    rng = np.random.default_rng(2)
    parts = [_affine(rng, (64, 128), bits, 64) for _ in range(3)]
    stack = QWeight.from_affine((_entries(*p[:3], bits) for p in parts), bits, 64, stacked=True, layout=layout)
    x = torch.from_numpy(rng.standard_normal((2, 128), dtype=np.float32)).bfloat16().float()
    for e, p in enumerate(parts):
        alone = QWeight.from_affine([_entries(*p[:3], bits)], bits, 64, stacked=False, layout=layout)
        torch.testing.assert_close(stack.mm(x, e), alone.mm(x), rtol=0, atol=0)
        torch.testing.assert_close(stack.mm(x, torch.tensor([e])), alone.mm(x), rtol=0, atol=0)  # an id tensor



@pytest.mark.parametrize("bits", [4, 8])
def test_expert_gemv_rows_are_their_entries_products(bits: int) -> None:
    """`expert_gemv`: each row of x against its own entry of a stack (repeated entries, rows at any
    entry, N off the kernel's blocks of 4), exactly the numbers `quant_gemv` gives that row alone, for
    float32 and bfloat16 x and scales; ids outside the stack or not one per row are errors that say so."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    rng = np.random.default_rng(11)
    wq, s, b, _ = _affine(rng, (4, 37, 192), bits, 64)
    x = torch.from_numpy(rng.standard_normal((5, 192), dtype=np.float32))
    ids = torch.tensor([3, 0, 3, 1, 2])
    for dtype in (torch.float32, torch.bfloat16):
        entries = [(q, sc.to(dtype), bi.to(dtype)) for q, sc, bi in
                   (_entries(wq[i], s[i], b[i], bits) for i in range(4))]
        stack = QWeight.from_affine(entries, bits, 64, stacked=True, layout="native")
        xd = x.to(dtype)
        got = cpu_kernels.expert_gemv(xd, stack.packed, stack.scales, ids, bits, 64)
        alone = torch.cat([stack.mm(xd[m : m + 1], int(e)) for m, e in enumerate(ids)])
        assert got.dtype == dtype and got.shape == (5, 37) and torch.equal(got, alone)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 4 is not an entry of 4"):
        cpu_kernels.expert_gemv(x, stack.packed, stack.scales, torch.tensor([0, 4, 1, 1, 1]), bits, 64)
    with pytest.raises(RuntimeError, match=r"ids must be contiguous int64 \[5\]"):
        cpu_kernels.expert_gemv(x, stack.packed, stack.scales, ids[:3], bits, 64)

@pytest.mark.parametrize("bits", [4, 8])
def test_expert_mm_runs_are_their_entries_products(bits: int) -> None:
    """`expert_mm`: runs of rows against the entries of a stack in order (empty runs, runs of 1-13 rows:
    both the quantized and the dequantized blocks, entries past counts' end unused), each run exactly
    the numbers `quant_gemv` gives its rows alone, for float32 and bfloat16 x and scales; counts that
    do not add up to the rows, negative ones or more than the stack's entries are errors that say so."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    rng = np.random.default_rng(12)
    wq, s, b, _ = _affine(rng, (5, 37, 192), bits, 64)
    counts = torch.tensor([2, 0, 13, 1, 7])
    x = torch.from_numpy(rng.standard_normal((23, 192), dtype=np.float32))
    for dtype in (torch.float32, torch.bfloat16):
        entries = [(q, sc.to(dtype), bi.to(dtype)) for q, sc, bi in
                   (_entries(wq[i], s[i], b[i], bits) for i in range(5))]
        stack = QWeight.from_affine(entries, bits, 64, stacked=True, layout="native")
        xd = x.to(dtype)
        for cs in (counts, counts[:3].clone().add_(torch.tensor([0, 8, 0]))):  # all entries; the first three
            got = cpu_kernels.expert_mm(xd, stack.packed, stack.scales, cs, bits, 64)
            starts = [0, *torch.cumsum(cs, 0).tolist()]
            alone = torch.cat([stack.mm(xd[starts[e] : starts[e + 1]], e) for e in range(len(cs)) if cs[e] > 0])
            assert got.dtype == dtype and got.shape == (23, 37) and torch.equal(got, alone)
    with pytest.raises(RuntimeError, match="counts add up to 22 rows, x has 23"):
        cpu_kernels.expert_mm(x, stack.packed, stack.scales, torch.tensor([2, 0, 12, 1, 7]), bits, 64)
    with pytest.raises(RuntimeError, match=r"counts\[1\] = -1 is negative"):
        cpu_kernels.expert_mm(x, stack.packed, stack.scales, torch.tensor([3, -1, 13, 1, 7]), bits, 64)
    with pytest.raises(RuntimeError, match="at most 5 entries"):
        cpu_kernels.expert_mm(x, stack.packed, stack.scales, torch.tensor([2, 0, 13, 1, 7, 0]), bits, 64)


def test_probe_rejects_kernels_that_misread_the_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe gates packed kernels on devices it cannot list: it passes the CPU kernels, refuses
    group sizes and widths they lack, and refuses a kernel whose products are off (here: zeros)."""
    assert _probe(torch.device("cpu"), 4, 64) and _probe(torch.device("cpu"), 8, 32)
    assert not _probe(torch.device("cpu"), 4, 48) and not _probe(torch.device("cpu"), 3, 64)
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda x, w, g, s: torch.zeros(x.shape[0], 64))
    assert not _probe.__wrapped__(torch.device("cpu"), 4, 64)
    assert not kernels_available(4, 64, "meta")
    assert fits(4, 72, 96, torch.device("cuda")) and not fits(4, 68, 96, torch.device("cuda"))
    assert not fits(4, 72, 80, torch.device("cuda")) and fits(4, 68, 96, torch.device("cpu"), 32)
    assert not fits(4, 68, 80, torch.device("cpu"), 32)  # the CPU: whole groups


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_products_are_the_affine_weight(bits: int) -> None:
    if not _cuda_kernel(bits):
        pytest.skip(f"no {bits}-bit packed kernel on this GPU: such weights are dequantized at load")
    rng = np.random.default_rng(3)
    parts = [_affine(rng, (96, 384), bits, 64) for _ in range(2)]
    x = torch.from_numpy(rng.standard_normal((5, 384), dtype=np.float32)).bfloat16().float()
    stack = QWeight.from_affine((_entries(*p[:3], bits) for p in parts), bits, 64, stacked=True, device="cuda")
    for e, p in enumerate(parts):
        cpu = QWeight.from_affine([_entries(*p[:3], bits)], bits, 64, stacked=False)
        ref = x @ torch.from_numpy(p[3]).T
        got = stack.mm(x.cuda(), e).cpu()
        assert (got - ref).abs().max() / ref.abs().max() < (8e-3 if bits == 4 else 2e-2)
        # both kernels round the same bfloat16 product: a bfloat16 step of the largest output at most
        assert (got - cpu.mm(x)).abs().max() <= 2**-7 * ref.abs().max()
        # decoding steps pick the entry by a device id (no host read): the same numbers
        torch.testing.assert_close(stack.mm(x.cuda(), torch.tensor([e], device="cuda")).cpu(), got, rtol=0, atol=0)
    # the codes (bits / 8 bytes each) and a bfloat16 scale and zero per group (4 bits) or scale per row (8 bits)
    assert stack.packed.device.type == "cuda"
    assert stack.nbytes == 2 * (96 * 384 * bits // 8 + (96 * 384 // 64 * 4 if bits == 4 else 96 * 2))


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


def _rows_per_call(monkeypatch: pytest.MonkeyPatch, kernel: str) -> list[int]:
    """The rows of x of each call of `cpu_kernels.<kernel>` from now on (the kernel still runs)."""
    calls: list[int] = []
    real = getattr(cpu_kernels, kernel)
    monkeypatch.setattr(cpu_kernels, kernel, lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    return calls


def test_demo_packed_decode_runs_experts_and_shared_in_one_call_each(demo_quantized: tuple[int, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding packed experts on the CPU: a step's expert slots and the shared expert in one `expert_gemv`
    call per product (two per MoE layer), with exactly the logits of one product per slot and the shared
    expert's own (the path for more slots than GATHER_MAX_SLOTS)."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    from backends import make

    from torch_backend import load_model, moe

    _, folder = demo_quantized
    model, backend = load_model(folder, dtype="float32", device="cpu"), make("torch")
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int64)[:16].reshape(1, 16)
    calls = _rows_per_call(monkeypatch, "expert_gemv")

    def decode() -> np.ndarray:
        cache = model.make_cache(1)
        backend.forward(model, tokens[:, :8], 0, cache)
        return np.concatenate([backend.forward(model, tokens[:, p : p + 1], p, cache) for p in range(8, 16)], axis=1)

    together = decode()
    # 8 steps, two calls per MoE layer, each over the token's top-k slots and its shared-expert row
    assert len(calls) == 2 * 8 * len(model.args.moe_layers) and set(calls) == {1 + model.args.moe_args.top_k}
    monkeypatch.setattr(moe.Experts, "packed_with_shared", lambda self, *a: None)
    np.testing.assert_array_equal(decode(), together)

@pytest.mark.parametrize("length", [40, 80])
def test_demo_packed_prefill_runs_experts_and_shared_in_one_call_each(
        demo_quantized: tuple[int, Path], monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    """A packed prefill on the CPU: its rows sorted by expert in one `expert_mm` call per product (two per MoE
    layer), with the shared expert's rows as the last run up to QUANT_MAX_ROWS tokens and on their own past
    that, with exactly the logits of one product per expert and the shared expert's own."""
    if not cpu_kernels.available():
        pytest.skip("the CPU kernels did not build")
    from backends import make

    from torch_backend import load_model, moe

    _, folder = demo_quantized
    model, backend = load_model(folder, dtype="float32", device="cpu"), make("torch")
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int64)[:length].reshape(1, length)
    calls = _rows_per_call(monkeypatch, "expert_mm")
    together = backend.forward(model, tokens, 0, model.make_cache(1))
    top_k = model.args.moe_args.top_k
    shared_rows = 0 if length > cpu_kernels.QUANT_MAX_ROWS else length
    assert len(calls) == 2 * len(model.args.moe_layers) and set(calls) == {length * top_k + shared_rows}
    monkeypatch.setattr(moe.Experts, "packed_with_shared", lambda self, *a: None)
    np.testing.assert_array_equal(backend.forward(model, tokens, 0, model.make_cache(1)), together)


def test_demo_packed_memory(demo_quantized: tuple[int, Path]) -> None:
    from torch_backend import load_model

    bits, folder = demo_quantized
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    packed = model_bytes(load_model(folder, device="cpu"))
    floats = model_bytes(load_model(folder, device="cpu", dequantize=True))
    # the folder's own bytes: the codes with a scale and a bias per group (torch's 8-bit layout: less,
    # one scale per row)
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


@needs_cuda
def test_demo_packed_on_cuda(demo_quantized: tuple[int, Path]) -> None:
    """On CUDA: packed where the GPU has the kernel, memory the folder's size, logits against the
    dequantized model on the GPU within 1.25x the bfloat16 model's error (4 bits) or the CPU kernels'
    error (8 bits: the same re-quantized weights), greedy tokens through CUDA graphs equal the eager
    step's."""
    import gc
    import itertools

    from backends import make
    from test_demo_model import heldout_loss

    from torch_backend import generate_step, load_model
    from torch_backend import load_tokenizer as tokenizer_of
    from torch_backend.graphs import DecodeRunner

    bits, folder = demo_quantized
    if not _cuda_kernel(bits):
        pytest.skip(f"no {bits}-bit packed kernel on this GPU: such weights are dequantized at load")
    gc.collect()  # models of earlier tests hold reference cycles: freed now, not during this load
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    small = load_model(folder, device="cuda")
    used = torch.cuda.memory_allocated() - before
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert small.layers[0].attention._qkv.quant is not None and small.layers[1].feed_forward.experts.packed
    assert model_bytes(small) <= used <= 1.02 * stored  # the allocator rounds each tensor up to 512 bytes
    del small
    packed = load_model(folder, dtype="float32", device="cuda")
    reference = load_model(folder, dtype="float32", device="cuda", dequantize=True)
    bf16 = load_model(folder, dtype="bfloat16", device="cuda", dequantize=True)
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int64)[:96].reshape(2, 48)
    want = _logits(reference, tokens)
    if bits == 4:
        level = np.abs(_logits(bf16, tokens) - want)
    else:
        cpu = load_model(folder, dtype="float32", device="cpu")
        level = np.abs(_logits(cpu, tokens) - _logits(load_model(folder, dtype="float32", device="cpu",
                                                                  dequantize=True), tokens))
    got = np.abs(_logits(packed, tokens) - want)
    assert got.max() <= 1.25 * level.max() and np.percentile(got, 99) <= 1.25 * np.percentile(level, 99)
    assert (_logits(packed, tokens).argmax(-1) == want.argmax(-1)).mean() >= 0.98
    backend = make("torch")
    assert abs(heldout_loss(backend, packed) - heldout_loss(backend, reference)) < 0.005
    # Greedy decoding in float32: through CUDA graphs the eager step's tokens, each one the dequantized
    # model's argmax up to twice the bound above (|packed - reference| on both logits).
    prompt = tokenizer_of(folder).encode("def fibonacci(n):")
    runs = []
    for graphs in (True, False):
        model = load_model(folder, dtype="float32", device="cuda", cuda_graphs=graphs)
        assert (DecodeRunner.for_model(model) is not None) == graphs
        runs.append(list(itertools.islice(generate_step(model, prompt), 32)))
    assert runs[0] == runs[1]
    ref = _logits(reference, np.array([prompt + runs[0][:-1]]))[0, len(prompt) - 1 :]  # [32, V]
    picked = ref[np.arange(32), runs[0]]
    assert (ref.max(-1) - picked <= 2 * 1.25 * level.max()).all()
