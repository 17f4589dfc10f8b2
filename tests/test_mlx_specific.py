"""MLX-only checks: parameter names, low-precision dtypes, RoPE `freqs` semantics, and the
expert kernels (sorted vs unsorted gather_mm, float32 fallback, only selected experts read)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends import MlxBackend  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from tiny import CONFIGS, random_weights, tiny_args  # noqa: E402

from common.datatypes import TransformerInput  # noqa: E402
from common.names import canonical_shapes  # noqa: E402
from common.rope import rope_cos_sin, rope_inv_freqs  # noqa: E402
from mlx_llm import moe  # noqa: E402
from mlx_llm.attention import Attention  # noqa: E402
from mlx_llm.model import Transformer  # noqa: E402

TOKENS = np.random.default_rng(1).integers(0, 128, (2, 40))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_names_and_shapes_are_canonical(name: str) -> None:
    args = CONFIGS[name]
    params = {k: tuple(v.shape) for k, v in tree_flatten(Transformer(args).parameters())}
    assert params == canonical_shapes(args)


def test_rope_periods_match_interleaved_cos_sin() -> None:
    # mx.fast.rope's `freqs` are periods; passing inverse frequencies would rotate wrongly.
    args = CONFIGS["llama3_rope"]
    attn = Attention(args, args.layer_roles[0])
    x = mx.array(np.random.default_rng(0).standard_normal((1, 2, 5, args.head_dim)).astype(np.float32))
    got = np.array(attn._rope(x, 1000))
    cos, sin = rope_cos_sin(rope_inv_freqs(args.head_dim, args.rope_theta, args.rope_scaling), 1000, 5)
    xn = np.array(x)
    want = np.empty_like(xn)
    want[..., 0::2] = xn[..., 0::2] * cos - xn[..., 1::2] * sin
    want[..., 1::2] = xn[..., 0::2] * sin + xn[..., 1::2] * cos
    np.testing.assert_allclose(got, want, atol=1e-5)


# Bounds measured on these weights (max |diff| vs float32): dense bf16 0.094, fp16 0.009.
@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 0.15), ("float16", 0.02)])
def test_low_precision_dense_close_to_float32(dtype: str, bound: float) -> None:
    args = tiny_args(moe_layers=(), moe_args=None)
    b, w = MlxBackend(), random_weights(args)
    ref = b.forward(b.build(args, w), TOKENS)
    model = b.build(args, w, dtype)
    out = b.forward(model, TOKENS)
    assert model(TransformerInput(tokens=mx.array(TOKENS.astype(np.int32)))).logits.dtype == mx.float32
    assert np.abs(out - ref).max() < bound
    assert model.layers[0].attention.wq.weight.dtype == getattr(mx, dtype)


def _experts(num_experts: int, dtype, seed: int = 0) -> moe.Experts:
    rng = np.random.default_rng(seed)
    e = moe.Experts(num_experts, 16, 24)
    for name in ("w_gate", "w_value", "w_out"):
        shape = getattr(e, name).shape
        setattr(e, name, mx.array((rng.standard_normal(shape) * 0.2).astype(np.float32)).astype(dtype))
    return e


def _slots(n: int, num_experts: int, seed: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((n, 16)).astype(np.float32))
    return x, mx.array(rng.integers(0, num_experts, n).astype(np.int32))


def test_sorted_expert_path_equals_unsorted() -> None:
    e = _experts(8, mx.float32)
    x, idx = _slots(100, 8)
    assert idx.size > moe.SORT_MIN_SLOTS
    np.testing.assert_allclose(np.array(e.apply_experts(x, idx, sort=True)),
                               np.array(e.apply_experts(x, idx, sort=False)), atol=1e-6)


def test_model_with_sorting_disabled_gives_same_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    args = CONFIGS["all_moe"]  # 2 x 40 tokens x top-2 = 160 slots per MoE layer: sorted
    b = MlxBackend()
    model = b.build(args, random_weights(args))
    sorted_out = b.forward(model, TOKENS)
    monkeypatch.setattr(moe, "SORT_MIN_SLOTS", 10**9)
    np.testing.assert_allclose(b.forward(model, TOKENS), sorted_out, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_experts_gathered_and_gather_mm_paths_agree(dtype: str) -> None:
    # Fewer slots than experts: only those experts' weights are cast; otherwise the whole tensor.
    e = _experts(8, getattr(mx, dtype))
    x, idx = _slots(5, 8)
    x = x.astype(getattr(mx, dtype))
    few = e.apply_experts(x, idx, sort=False)
    many = e.apply_experts(mx.concatenate([x, x]), mx.concatenate([idx, idx]), sort=False)[:5]
    assert few.dtype == getattr(mx, dtype)
    np.testing.assert_array_equal(np.array(few.astype(mx.float32)), np.array(many.astype(mx.float32)))
    ref = _experts(8, mx.float32).apply_experts(x.astype(mx.float32), idx, sort=False)
    np.testing.assert_allclose(np.array(few.astype(mx.float32)), np.array(ref), atol=0.05)


@pytest.mark.parametrize("n", [3, 100])
def test_unselected_experts_are_never_read(n: int) -> None:
    # NaN weights in experts no slot selects must not reach the output (a dense
    # all-experts product would give NaN * 0 = NaN).
    e = _experts(8, mx.float32)
    x, idx = _slots(n, 8)
    idx = idx % 4  # experts 4..7 unused
    ref = np.array(e.apply_experts(x, idx, sort=n > moe.SORT_MIN_SLOTS))
    for name in ("w_gate", "w_value", "w_out"):
        w = getattr(e, name)
        setattr(e, name, mx.concatenate([w[:4], mx.full(w[4:].shape, np.nan)]))
    out = np.array(e.apply_experts(x, idx, sort=n > moe.SORT_MIN_SLOTS))
    np.testing.assert_array_equal(out, ref)
