"""The speed paths give the numbers of the plain ones: fused projections (and their fallbacks),
last-position logits, cache rewinds, per-slot experts and generation that runs one step ahead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from backends import MlxBackend, TorchBackend, available
from tiny import CONFIGS, random_weights

from common.datatypes import TransformerInput

ARGS = CONFIGS["dense_moe"]  # dense and MoE layers, a NoPE layer, chunks of 8
WEIGHTS = random_weights(ARGS, seed=3)
TOKENS = np.random.default_rng(4).integers(0, ARGS.vocab_size, size=(2, 26))


def _logits(backend, model, tokens: np.ndarray, position: int = 0, cache=None, **kw) -> np.ndarray:
    if backend.name == "torch":
        import torch

        with torch.inference_mode():
            out = model(TransformerInput(tokens=torch.from_numpy(tokens.astype(np.int64)), tokens_position=position),
                        cache=cache, **kw)
        return out.logits.numpy()
    import mlx.core as mx

    out = model(TransformerInput(tokens=mx.array(tokens.astype(np.int32)), tokens_position=position), cache=cache, **kw)
    return np.array(out.logits)


def test_last_only_is_the_last_row(backend) -> None:
    model = backend.build(ARGS, WEIGHTS)
    full = _logits(backend, model, TOKENS)
    np.testing.assert_allclose(_logits(backend, model, TOKENS, last_only=True), full[:, -1:], atol=1e-5, rtol=0)
    cache = model.make_cache(2)  # a cached prefill whose keys span several chunks
    _logits(backend, model, TOKENS[:, :5], 0, cache)
    np.testing.assert_allclose(_logits(backend, model, TOKENS[:, 5:], 5, cache, last_only=True), full[:, -1:],
                               atol=1e-5, rtol=0)
    assert cache[0].offset == TOKENS.shape[1]
    np.testing.assert_allclose(_logits(backend, model, TOKENS[:, :1], TOKENS.shape[1], cache)[:, 0],
                               _logits(backend, model, np.concatenate([TOKENS, TOKENS[:, :1]], 1))[:, -1],
                               atol=1e-5, rtol=0)  # and the cache holds every position


def test_rewound_cache_repeats_the_step(backend) -> None:
    model = backend.build(ARGS, WEIGHTS)
    cache = model.make_cache(2)
    for end in (11, 15, 24):  # the token at: inside a chunk, a chunk's last and a new chunk's first position
        start = cache[0].offset
        _logits(backend, model, TOKENS[:, start:end], start, cache)
        first = _logits(backend, model, TOKENS[:, end : end + 1], end, cache)
        for c in cache:
            c.rewind(1)
        assert cache[0].offset == end
        np.testing.assert_array_equal(_logits(backend, model, TOKENS[:, end : end + 1], end, cache), first)


def test_chunk_ring_refuses_to_rewind_across_a_chunk(backend) -> None:
    model = backend.build(ARGS, WEIGHTS)
    cache = model.make_cache(2)
    _logits(backend, model, TOKENS[:, :17], 0, cache)  # positions 0..16; 16 starts a new chunk of 8
    ring = next(c for c in cache if hasattr(c, "chunk_size"))
    with pytest.raises(ValueError, match="across a chunk"):
        ring.rewind(2)  # position 15's slot 7 still holds it, but slot 0 now holds 16, not 8
    ring.rewind(1)
    assert ring.offset == 16


def test_generation_running_ahead_leaves_the_cache_at_the_last_taken_token(backend) -> None:
    module = __import__(f"{'mlx_llm' if backend.name == 'mlx' else 'torch_backend'}.generate", fromlist=["x"])
    model = backend.build(ARGS, WEIGHTS)
    prompt = TOKENS[0, :9].tolist()
    cache = model.make_cache(1)
    steps = module.generate_step(model, prompt, cache=cache)
    first = [next(steps) for _ in range(5)]
    steps.close()
    assert cache[0].offset == len(prompt) + 4  # the last token taken is not in the cache yet
    more = module.generate_step(model, first[-1:], cache=cache)
    rest = [next(more) for _ in range(4)]
    more.close()
    one_shot = module.generate_step(model, prompt)
    assert [next(one_shot) for _ in range(9)] == first + rest


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_fused_and_per_parameter_paths_agree() -> None:
    import torch

    model = TorchBackend().build(ARGS, WEIGHTS)
    tokens = torch.from_numpy(TOKENS.astype(np.int64))
    with torch.no_grad():  # the fused storage
        assert model.layers[0].attention._qkv.weight() is not None
        fused = model(TransformerInput(tokens=tokens)).logits
    with torch.enable_grad():  # autograd on: each canonical parameter on its own
        assert model.layers[0].attention._qkv.weight() is None
        plain = model(TransformerInput(tokens=tokens)).logits.detach()
    np.testing.assert_allclose(fused.numpy(), plain.numpy(), atol=1e-5, rtol=0)


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_fused_storage_follows_dtype_changes_and_assigning_loads() -> None:
    import torch

    from torch_backend.model import Transformer

    model = TorchBackend().build(ARGS, WEIGHTS)
    wk = model.layers[0].attention.wk.weight
    model = model.to(torch.bfloat16)
    assert model.layers[0].attention.wk.weight is wk  # the same Parameter, now a view of new storage
    state = model.state_dict()
    assert set(state) == set(WEIGHTS) and all(tuple(state[k].shape) == v.shape for k, v in WEIGHTS.items())
    wq = torch.from_numpy(WEIGHTS["layers.0.attention.wq.weight"]).bfloat16()
    torch.testing.assert_close(state["layers.0.attention.wq.weight"], wq, atol=0, rtol=0)
    with torch.no_grad():
        assert model.layers[0].attention._qkv.weight().dtype == torch.bfloat16  # rebuilt by .to()
    with torch.device("meta"):
        fresh = Transformer(ARGS)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in WEIGHTS.items()}, strict=True, assign=True)
    with torch.no_grad():
        assert fresh.layers[1].feed_forward.experts._fused()[0] is not None  # rebuilt after assign
        torch.testing.assert_close(fresh.layers[1].feed_forward.experts.w_value,
                                   torch.from_numpy(WEIGHTS["layers.1.feed_forward.experts.w_value"]))


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_grouped_per_slot_gathered_and_sorted_experts_agree(dtype: str) -> None:
    import torch

    from torch_backend.moe import grouped_experts, grouped_fits

    experts = TorchBackend().build(ARGS, WEIGHTS, dtype).layers[1].feed_forward.experts
    tol = 1e-6 if dtype == "float32" else 2e-2
    for n in (3, 40):  # decode-sized and prefill-sized
        x = torch.from_numpy(np.random.default_rng(n).standard_normal((n, ARGS.dim)).astype(np.float32)).to(
            getattr(torch, dtype))
        ids = torch.from_numpy(np.random.default_rng(n + 1).integers(0, ARGS.num_experts, n))
        with torch.inference_mode():
            gv, out = experts._fused()
            assert grouped_fits(x, gv, out)
            grouped = experts(x, ids)  # the general path: two grouped products
            reference = grouped_experts(x.float(), ids, gv[:-1].float(), out[:-1].float())
            per_slot = torch.cat([experts._expert(x[i : i + 1], int(e)) for i, e in enumerate(ids)])
            gathered = experts._expert(x[:, None, :], ids)[:, 0, :]  # the accelerators' fallback
            sorted_ = experts._sorted(x, ids)
        for other in (per_slot, gathered, sorted_, reference):
            torch.testing.assert_close(grouped.float(), other.float(), atol=tol, rtol=0)


@pytest.mark.skipif("mlx" not in available(), reason="mlx is not installed")
def test_mlx_fused_and_separate_projections_agree() -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    b = MlxBackend()
    model = b.build(ARGS, WEIGHTS)
    plain = b.forward(model, TOKENS)
    model.fuse()
    assert model.layers[1].feed_forward.experts._gate_value.current() is not None
    np.testing.assert_allclose(b.forward(model, TOKENS), plain, atol=1e-5, rtol=0)
    params = dict(tree_flatten(model.parameters()))
    np.testing.assert_array_equal(np.array(params["layers.0.attention.wk.weight"]),
                                  WEIGHTS["layers.0.attention.wk.weight"])
    model.load_weights([(k, v * 1) for k, v in params.items()])  # new arrays: the fused copy is stale
    mx.eval(model.parameters())
    assert model.layers[0].attention._qkv.current() is None
    np.testing.assert_allclose(b.forward(model, TOKENS), plain, atol=1e-5, rtol=0)


@pytest.mark.skipif("mlx" not in available(), reason="mlx is not installed")
def test_mlx_fused_quantized_layers_agree(tmp_path: Path) -> None:
    import mlx.core as mx
    from folders import write_hf
    from mlx.utils import tree_flatten

    from apps.convert import convert
    from common.args import QuantizationArgs
    from mlx_llm import load_model

    out = convert(write_hf(tmp_path / "src", ARGS, WEIGHTS), tmp_path / "q4", QuantizationArgs(group_size=32, bits=4))
    model = load_model(out)  # fused on load
    assert model.layers[0].attention._qkv.current() is not None
    fused = MlxBackend().forward(model, TOKENS)
    model.load_weights([(k, v * 1 if v.dtype != mx.uint32 else v + 0) for k, v in
                        tree_flatten(model.parameters())])
    assert model.layers[0].attention._qkv.current() is None
    np.testing.assert_allclose(MlxBackend().forward(model, TOKENS), fused, atol=1e-5, rtol=0)


@pytest.mark.skipif("mlx" not in available(), reason="mlx is not installed")
@pytest.mark.parametrize("bits", [None, 4])
def test_mlx_products_split_over_cpu_streams_equal_whole_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 bits: int | None) -> None:
    from folders import write_hf

    import mlx_llm.parallel as parallel
    from apps.convert import convert
    from common.args import QuantizationArgs
    from mlx_llm import load_model

    src = write_hf(tmp_path / "src", ARGS, WEIGHTS)
    model = load_model(src if bits is None else convert(src, tmp_path / "q", QuantizationArgs(32, bits)))
    monkeypatch.setattr(parallel, "cpu_streams", lambda: ())
    whole = MlxBackend().forward(model, TOKENS)
    monkeypatch.setattr(parallel, "cpu_streams", lambda: parallel._streams(3))  # 3 parts, uneven splits
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    np.testing.assert_allclose(MlxBackend().forward(model, TOKENS), whole, atol=1e-6, rtol=0)


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_products_split_over_threads_equal_whole_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import torch_backend.fused as fused

    b = TorchBackend()
    model = b.build(ARGS, WEIGHTS)

    def decode() -> np.ndarray:
        cache = model.make_cache(2)
        b.forward(model, TOKENS[:, :6], 0, cache)
        return np.concatenate([b.forward(model, TOKENS[:, p : p + 1], p, cache) for p in range(6, 12)], axis=1)

    whole = decode()
    threads = torch.get_num_threads()
    monkeypatch.setattr(fused, "SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(fused, "SPLIT_MIN_INPUTS", 16)
    torch.set_num_threads(4)  # 4 parts of the inputs
    try:
        split = decode()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(split, whole, atol=1e-5, rtol=0)


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_torch_reduced_precision_cpu_products_accumulate_in_float32(dtype: str, rows: int) -> None:
    import torch

    from torch_backend.fused import linear

    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 512, generator=gen).to(getattr(torch, dtype))  # [O, I], as CPU storage holds it
    x = torch.randn(rows, 512, generator=gen).to(getattr(torch, dtype))
    with torch.inference_mode():
        got = linear(x, w).float()
        with pytest.raises(RuntimeError):
            linear(x[:, :100], w)  # a failing product still switches oneDNN back on
    assert torch.backends.mkldnn.enabled
    want = x.double() @ w.double().T  # exact products of the rounded inputs
    # float32 sums rounded once to the dtype: within half its spacing (2^-8 / 2^-11 relative) plus
    # the float32 sum's own error; sums kept in the low-precision dtype miss by ~10x more.
    half_spacing = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    assert ((got.double() - want).abs() <= half_spacing * want.abs() + 1e-3).all()


# MoE routing can flip on near-tied router logits, so a few rows jump; the mean stays small
# (measured mean |diff| against float32: bf16 <= 0.016, fp16 <= 0.001 over these configs).
@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 0.03), ("float16", 0.005)])
@pytest.mark.parametrize("name", ["dense_moe", "all_moe", "top1_of_8"])
def test_low_precision_model_decodes_close_to_float32(backend, name: str, dtype: str, bound: float) -> None:
    args = CONFIGS[name]
    w = random_weights(args)
    ref = backend.forward(backend.build(args, w), TOKENS)
    model = backend.build(args, w, dtype)
    if backend.name == "torch":
        import torch

        attention = model.layers[0].attention
        with torch.no_grad():  # CPU: stored [sum O, I], the parameters plain row blocks of the fused weight
            assert attention._qkv.weight() is attention._qkv.storage and attention.wk.weight.is_contiguous()
    cache = model.make_cache(2)
    steps = [backend.forward(model, TOKENS[:, :9], 0, cache)]
    steps += [backend.forward(model, TOKENS[:, p : p + 1], p, cache) for p in range(9, 20)]  # 2 rows per step
    assert str(cache[0].keys.dtype).endswith(dtype)
    out = backend.forward(model, TOKENS)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).mean() < bound
    assert np.abs(np.concatenate(steps, 1) - ref[:, :20]).mean() < bound


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_cpu_rms_norm_equals_the_float32_cast_pair(dtype: str) -> None:
    import torch
    import torch.nn.functional as F

    from torch_backend.attention import rms_norm

    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 7, 512), (3, 5, 10, 64), (1, 1, 5120)]:
        scale = torch.rand(*shape[:-1], 1, generator=gen) * 10  # rows of very different sizes
        x = (torch.randn(shape, generator=gen) * scale).to(getattr(torch, dtype))
        want = F.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(x.dtype)  # the reference's float32 math
        assert torch.equal(rms_norm(x, 1e-5), want)


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_one_token_runs_its_expert_and_the_shared_one_together(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from torch_backend import moe

    b = TorchBackend()
    model = b.build(ARGS, WEIGHTS)
    ff = model.layers[ARGS.moe_layers[0]].feed_forward
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((1, ARGS.dim)).astype(np.float32))
    with torch.no_grad():
        for e in range(ARGS.moe_args.num_experts):
            both = ff.experts.with_shared(x * 0.7, e, x)  # entries e and E of the fused storage
            # the shared expert through its own (canonical, unfused) parameters
            torch.testing.assert_close(both, ff.experts._expert(x * 0.7, e) + ff.shared_expert(x), atol=1e-6, rtol=0)
        assert b.build(ARGS, WEIGHTS, "bfloat16").layers[ARGS.moe_layers[0]].feed_forward.experts.with_shared(
            x.bfloat16(), 0, x.bfloat16()) is None  # reduced precision: the native per-matrix products instead

    calls = []
    real = moe.Experts.with_shared
    monkeypatch.setattr(moe.Experts, "with_shared", lambda self, *a: calls.append(1) or real(self, *a))

    def decode() -> np.ndarray:
        cache = model.make_cache(1)
        b.forward(model, TOKENS[:1, :6], 0, cache)
        return np.concatenate([b.forward(model, TOKENS[:1, p : p + 1], p, cache) for p in range(6, 14)], axis=1)

    together = decode()
    assert len(calls) == 8 * len(ARGS.moe_layers)  # every decode step of every MoE layer
    monkeypatch.setattr(moe.Experts, "with_shared", lambda self, *a: None)
    np.testing.assert_allclose(decode(), together, atol=1e-5, rtol=0)


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_long_prefill_attends_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt of many chunks in one call: the chunked layers' score blocks stay within C x C (memory
    O(L*C)), and the logits equal token-by-token decoding."""
    import torch.nn.functional as F

    backend, C = TorchBackend(), ARGS.attention_chunk_size
    model = backend.build(ARGS, WEIGHTS)
    tokens = np.random.default_rng(3).integers(0, ARGS.vocab_size, (1, 6 * C + 3))
    cache = model.make_cache(1)
    steps = [backend.forward(model, tokens[:, i : i + 1], i, cache)[0, 0] for i in range(tokens.shape[1])]
    blocks, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        blocks.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    cache = model.make_cache(1)
    backend.forward(model, tokens[:, :5], 0, cache)
    whole = backend.forward(model, tokens[:, 5:], 5, cache)[0]  # from inside the first chunk to the end
    np.testing.assert_allclose(whole, np.stack(steps[5:]), atol=1e-4, rtol=0)
    chunked_layers = sum(r.chunked for r in ARGS.layer_roles)
    assert sum(1 for q, k in blocks if q <= C and k <= C) >= 7 * chunked_layers  # 7 chunks touched per layer
    assert max(q * k for q, k in blocks if q <= C) <= C * C


@pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
def test_torch_bfloat16_decode_per_slot_experts_give_the_grouped_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding token on the CPU runs its expert's two products in place (grouped products walk every
    expert: 124 against 102 decode tokens/s on the small benchmark model): the same greedy text from the
    demo model in bfloat16."""
    import torch_backend
    from torch_backend import moe

    demo = Path(__file__).parent.parent / "apps" / "demo_model"
    model, tok = torch_backend.load(demo, dtype="bfloat16", device="cpu")
    texts = [torch_backend.generate(model, tok, "def fibonacci(n):", max_tokens=64)]
    monkeypatch.setattr(moe, "GATHER_MAX_SLOTS", 0)  # every token through `grouped_experts`
    texts.append(torch_backend.generate(model, tok, "def fibonacci(n):", max_tokens=64))
    assert texts[0] == texts[1] and len(texts[0]) > 60
