"""The project's CPU kernels (`torch_backend.cpu_kernels`): decode attention against the float32 reference
math, the order-independence of masked keys (and that hidden slots are never read), the router's logits
and top-k against torch's, float32 prefill expert runs against float64 and against the grouped-products
path, and the fallback when they are switched off.

(The other products are checked in test_torch_packed.py: bfloat16/float16 and MLX's affine 8/4-bit.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_backend import cpu_kernels  # noqa: E402

ROOT = Path(__file__).parent.parent
needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build")


def _reference(q, k, v, scale, mask):
    """The attention of one query per sequence in float64: q [B, 1, H, d], k/v [B, KV, S, d] -> [B, 1, H*d]."""
    B, _, H, d = q.shape
    KV = k.shape[1]
    qg = q.double().reshape(B, KV, H // KV, d) * scale  # [B, KV, G, d]
    scores = qg @ k.double().transpose(-1, -2)  # [B, KV, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1) @ v.double()).reshape(B, 1, H * d)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("keys", "head_dim"), [(1, 64), (7, 64), (256, 64), (300, 128), (33, 48)])
def test_decode_attention_is_the_float32_math(dtype: torch.dtype, keys: int, head_dim: int) -> None:
    """Scores, softmax and weighted values in float32 (the exponential within 2 ulp), with and without
    a mask, GQA 8:2, strided caches (views of a longer one): float32 within 2e-6 of the float64 result;
    reduced precision rounds the float32 result once."""
    gen = torch.Generator().manual_seed(keys)
    q = (torch.randn((2, 1, 8, head_dim), generator=gen) * 3).to(dtype)
    storage = torch.randn((2, 2, keys + 5, head_dim), generator=gen).to(dtype)
    k, v = storage[:, :, :keys], storage.flip(2)[:, :, :keys]  # views: rows keys+5 apart
    mask = torch.rand((2, keys), generator=gen) > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        want = _reference(q, k, v, head_dim**-0.5, m)
        got = cpu_kernels.decode_attention(q, k, v, head_dim**-0.5, m)
        assert got.dtype == dtype and got.shape == (2, 1, 8 * head_dim)
        err = (got.double() - want).abs().max().item()
        if dtype == torch.float32:
            assert err <= 2e-6 * max(1.0, want.abs().max().item())
        else:
            step = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
            assert ((got.double() - want).abs() <= step * want.abs() + 1e-5).all(), err



@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [16, 20, 128])
def test_router_topk_is_the_linear_layers_top_k(dtype: torch.dtype, experts: int) -> None:
    """`router_topk`: torch's linear + topk, ids equal, values within float32 summation order (bfloat16:
    the same rounded values), for the weight stored [E, D] and input-major ([D, E] storage's view, as the
    float32 CPU router keeps it); ties go to the lower id and NaN logits rank first; k is checked."""
    gen = torch.Generator().manual_seed(experts)
    x = torch.randn(5, 320, generator=gen).to(dtype)
    storage = torch.randn(320, experts, generator=gen).to(dtype)
    for w in (storage.T, storage.T.contiguous()):
        for k in (1, 2, 4):
            values, ids = cpu_kernels.router_topk(x, w, k)
            logits = torch.nn.functional.linear(x, w)
            want_values, want_ids = torch.topk(logits, k)
            tol = 2e-6 * float(want_values.float().abs().max())
            assert values.dtype == dtype and ids.dtype == torch.int64
            assert (values.float() - want_values.float()).abs().max() <= tol
            # the ids hold those values (bfloat16 logits tie often among 128 experts, in either order)
            assert (logits.gather(1, ids).float() - values.float()).abs().max() <= tol
            if dtype == torch.float32:
                assert torch.equal(ids, want_ids)
    w = torch.zeros(experts, 320, dtype=dtype)
    w[3, 0] = w[7, 0] = 1.0  # experts 3 and 7 tie
    w[9, 0] = float("nan")
    x = torch.zeros(1, 320, dtype=dtype)
    x[0, 0] = 1.0
    assert cpu_kernels.router_topk(x, w, 3)[1].tolist() == [[9, 3, 7]]
    with pytest.raises(RuntimeError, match=f"k = {experts + 1} must be in \\[1, {experts}\\]"):
        cpu_kernels.router_topk(x, w, experts + 1)

@needs_kernels
def test_masked_keys_change_nothing() -> None:
    """A query over a cache of 40 slots where only the first 21 are visible gives the very numbers of
    the same query over those 21 keys alone (masked keys add exact zeros, in the same lanes)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn((1, 1, 4, 64), generator=gen)
    k, v = torch.randn((1, 1, 40, 64), generator=gen), torch.randn((1, 1, 40, 64), generator=gen)
    mask = torch.zeros((1, 40), dtype=torch.bool)
    mask[:, :21] = True
    whole = cpu_kernels.decode_attention(q, k, v, 0.125, mask)
    alone = cpu_kernels.decode_attention(q, k[:, :, :21], v[:, :, :21], 0.125)
    assert torch.equal(whole, alone)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 48])
def test_hidden_keys_are_never_read(dtype: torch.dtype, head_dim: int) -> None:
    """Visible slots 5..25 (a hole at 9) of 40, per row another span: NaN keys and values in every
    hidden slot give the very numbers of finite ones (the kernel reads only the visible span)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn((2, 1, 4, head_dim), generator=gen).to(dtype)
    k, v = (torch.randn((2, 2, 40, head_dim), generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros((2, 40), dtype=torch.bool)
    mask[0, 5:26] = True
    mask[0, 9] = False
    mask[1, 17:40] = True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    hidden = ~mask[:, None, :, None].expand_as(k)
    poisoned_k[hidden], poisoned_v[hidden] = float("nan"), float("nan")
    want = cpu_kernels.decode_attention(q, k, v, 0.125, mask)
    got = cpu_kernels.decode_attention(q, poisoned_k, poisoned_v, 0.125, mask)
    assert torch.isfinite(want.float()).all() and torch.equal(got, want)
    ref = _reference(q, k, v, 0.125, mask)
    assert (want.double() - ref).abs().max() <= (2e-6 if dtype == torch.float32 else 2e-2)


@needs_kernels
def test_extreme_scores_stay_finite() -> None:
    """Scores far apart (one key dominating by 1e4) and far below zero: a softmax without overflow."""
    q = torch.zeros((1, 1, 1, 16))
    q[..., 0] = 1.0
    k = torch.zeros((1, 1, 20, 16))
    k[0, 0, :, 0] = torch.linspace(-1e4, 0.0, 20)
    v = torch.arange(20.0).repeat_interleave(16).view(1, 1, 20, 16)
    got = cpu_kernels.decode_attention(q, k, v, 1.0)
    torch.testing.assert_close(got, torch.full((1, 1, 16), 19.0), rtol=0, atol=0)


def test_switched_off_decodes_the_same_tokens_with_torch_kernels() -> None:
    """LLAMA4_CPU_KERNELS=0: nothing is built or loaded, and the torch backend generates through torch's
    own products and attention; the bfloat16 demo model's greedy text is the kernels' text."""
    from torch_backend import generate, load

    prompt, n = "def fibonacci(n):", 24
    code = ("import torch; from torch_backend import cpu_kernels, load, generate;"
            "assert not cpu_kernels.available();"
            "m, t = load('apps/demo_model', device='cpu', dtype='bfloat16');"
            f"print(repr(generate(m, t, {prompt!r}, max_tokens={n})));"
            "assert not hasattr(torch.ops.llama4_cpu, 'reduced_gemv')")
    env = {**os.environ, "LLAMA4_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    model, tok = load(ROOT / "apps" / "demo_model", device="cpu", dtype="bfloat16")
    assert out.stdout.strip() == repr(generate(model, tok, prompt, max_tokens=n))


def test_compiled_attention_fallback_is_the_reference_math() -> None:
    """Where the kernels are missing, the compiled CPU step writes decode attention as broadcast sums
    (`_decode_attention_loops`); run eagerly here: the float32 math within 2e-6, masked or not."""
    from torch_backend.attention import _decode_attention_loops

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(s, generator=gen) for s in ((2, 1, 8, 64), (2, 2, 30, 64), (2, 2, 30, 64)))
    mask = torch.rand((2, 30), generator=gen) > 0.5
    mask[:, 0] = True
    for m in (None, mask):
        got = _decode_attention_loops(q, k, v, 0.125, m)
        assert (got.double() - _reference(q, k, v, 0.125, m)).abs().max() <= 2e-6


def _fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)


def test_a_failing_compiler_warns_and_falls_back(tmp_path: Path) -> None:
    """A compiler that fails every flag set: one warning naming the failure, no library left in the
    cache, and the model still generates (torch's kernels)."""
    fake = tmp_path / "broken-c++"
    fake.write_text("#!/bin/sh\necho 'internal compiler error: simulated' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = ("from torch_backend import cpu_kernels, load, generate;"
            "assert not cpu_kernels.available();"
            "m, t = load('apps/demo_model', device='cpu', dtype='bfloat16');"
            "print(len(generate(m, t, 'def add(a, b):', max_tokens=6)))")
    out = _fresh_process(code, CXX=str(fake), LLAMA4_KERNEL_CACHE=str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "building the CPU decode kernels failed" in out.stderr and "simulated" in out.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-written library


@needs_kernels
def test_a_damaged_cached_library_is_rebuilt(tmp_path: Path) -> None:
    """The cached library cut short (as a full disk leaves it): the next process rebuilds it and runs."""
    cache = tmp_path / "cache"
    code = "from torch_backend import cpu_kernels; assert cpu_kernels.available()"
    assert _fresh_process(code, LLAMA4_KERNEL_CACHE=str(cache)).returncode == 0
    (lib,) = list(cache.rglob("cpu_kernels-*.so"))
    lib.write_bytes(lib.read_bytes()[:4096])
    out = _fresh_process(code + "; import torch; print(torch.ops.llama4_cpu.reduced_gemv)",
                         LLAMA4_KERNEL_CACHE=str(cache))
    assert out.returncode == 0, out.stderr[-2000:]
    assert lib.stat().st_size > 4096


@needs_kernels
def test_expert_mm_float_runs_are_their_entries_products() -> None:
    """`expert_mm_float`: runs of rows against a float32 input-major stack [E, K, N] in order (empty runs,
    1 to 40 rows; N past whole tiles of 64,
    K not a multiple of 16; entries past counts' end unused) within float32 rounding of the float64
    products; counts that do not add up, negative ones or more than the stack's entries are errors."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn((6, 200, 150), generator=gen)  # [E, K, N]
    counts = torch.tensor([3, 0, 17, 1, 40, 16])
    x = torch.randn((77, 200), generator=gen)
    for cs in (counts, torch.tensor([3, 0, 74])):
        got = cpu_kernels.expert_mm_float(x, w, cs)
        starts = [0, *torch.cumsum(cs, 0).tolist()]
        want = torch.cat([x[starts[e] : starts[e + 1]].double() @ w[e].double() for e in range(len(cs))])
        assert got.dtype == torch.float32 and got.shape == (77, 150)
        assert (got.double() - want).abs().max() <= 2e-6 * 200**0.5 * want.abs().max()
    with pytest.raises(RuntimeError, match="counts add up to 76 rows, x has 77"):
        cpu_kernels.expert_mm_float(x, w, torch.tensor([3, 0, 16, 1, 40, 16]))
    with pytest.raises(RuntimeError, match=r"counts\[1\] = -1 is negative"):
        cpu_kernels.expert_mm_float(x, w, torch.tensor([4, -1, 17, 1, 40, 16]))
    with pytest.raises(RuntimeError, match="at most 6 entries"):
        cpu_kernels.expert_mm_float(x, w, torch.tensor([3, 0, 17, 1, 40, 16, 0]))
    with pytest.raises(RuntimeError, match="contiguous float32 w"):
        cpu_kernels.expert_mm_float(x, w.transpose(1, 2), counts)


@needs_kernels
def test_float32_prefill_runs_the_experts_in_one_call_per_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 prefill on the CPU: the slots sorted by expert in one `expert_mm_float` call per product (two
    per MoE layer), logits within 1e-5 of the grouped products' path (`torch._grouped_mm`); a prompt of more
    than FLOAT_RUN_ROWS slots per expert takes the grouped products."""
    from backends import TorchBackend
    from tiny import CONFIGS, random_weights

    from torch_backend import moe

    args = CONFIGS["all_moe"]
    model, backend = TorchBackend().build(args, random_weights(args, seed=2)), TorchBackend()
    n = moe.FLOAT_RUN_ROWS * args.moe_args.num_experts // args.moe_args.top_k  # tokens: 16 slots per expert
    tokens = np.arange(3, 3 + n + 1, dtype=np.int64).reshape(1, n + 1) % args.vocab_size
    calls: list[int] = []
    real = cpu_kernels.expert_mm_float
    monkeypatch.setattr(cpu_kernels, "expert_mm_float", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    runs = backend.forward(model, tokens[:, :n], 0, model.make_cache(1))
    assert len(calls) == 2 * len(args.moe_layers) and set(calls) == {n * args.moe_args.top_k}
    backend.forward(model, tokens, 0, model.make_cache(1))  # one more token: past the runs' limit
    assert len(calls) == 2 * len(args.moe_layers)
    monkeypatch.setattr(moe.Experts, "_float_runs", lambda self, *a: None)
    grouped = backend.forward(model, tokens[:, :n], 0, model.make_cache(1))
    np.testing.assert_allclose(grouped, runs, rtol=0, atol=1e-5)
