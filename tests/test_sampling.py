"""Shared sampling rules: validation, greedy, top-k / top-p / min-p, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from common.sampling import (
    SamplingParams,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    filter_logits,
    make_rng,
    sample_numpy,
    softmax,
)

PROBS = np.array([0.15, 0.5, 0.05, 0.3])  # sorted: ids 1 (.5), 3 (.3), 0 (.15), 2 (.05)
LOGITS = np.log(PROBS)


def kept(logits: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(logits)).tolist()


def reference_top_p(probs: np.ndarray, p: float) -> np.ndarray:
    """Llama's sample_top_p mask, written out: zero tokens whose preceding mass exceeds p."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    mask = np.cumsum(sorted_p) - sorted_p > p
    sorted_p = np.where(mask, 0.0, sorted_p)
    out = np.zeros_like(probs)
    out[order] = sorted_p
    return out / out.sum()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": -3}, "seed"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_params_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams(**kwargs)


def test_params_defaults_are_greedy_and_frozen() -> None:
    params = SamplingParams()
    assert params.greedy and (params.top_p, params.top_k, params.min_p, params.seed) == (1.0, 0, 0.0, None)
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        assert sample_numpy(logits, SamplingParams(), rng) == int(np.argmax(logits))
    assert sample_numpy(np.array([1.0, 3.0, 3.0]), SamplingParams(), rng) == 1  # tie -> lowest id


def test_top_k() -> None:
    assert kept(apply_top_k(LOGITS, 2)) == [1, 3]
    assert kept(apply_top_k(LOGITS, 0)) == [0, 1, 2, 3]
    assert kept(apply_top_k(LOGITS, 9)) == [0, 1, 2, 3]
    assert kept(apply_top_k(np.array([1.0, 2.0, 2.0, 0.0]), 1)) == [1, 2]  # ties at the boundary stay
    np.testing.assert_array_equal(apply_top_k(LOGITS, 2)[[1, 3]], LOGITS[[1, 3]])


@pytest.mark.parametrize(("p", "expected"), [(0.49, [1]), (0.5, [1, 3]), (0.7, [1, 3]), (0.8, [0, 1, 3]),
                                             (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])  # fmt: skip
def test_top_p_drops_when_mass_before_exceeds_p(p: float, expected: list[int]) -> None:
    out = apply_top_p(LOGITS, p)
    assert kept(out) == expected
    np.testing.assert_allclose(softmax(out), reference_top_p(PROBS, p), atol=1e-12)


def test_top_p_keeps_first_and_handles_batches() -> None:
    peaked = np.log(np.array([0.01, 0.98, 0.01]))
    assert kept(apply_top_p(peaked, 1e-6)) == [1]
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((3, 40))
    out = apply_top_p(batch, 0.6)
    for row, row_out in zip(batch, out, strict=True):
        np.testing.assert_array_equal(row_out, apply_top_p(row, 0.6))
        np.testing.assert_allclose(softmax(row_out), reference_top_p(softmax(row), 0.6), atol=1e-12)


def test_min_p() -> None:
    assert kept(apply_min_p(LOGITS, 0.2)) == [0, 1, 3]  # threshold 0.1
    assert kept(apply_min_p(LOGITS, 0.5)) == [1, 3]  # threshold 0.25
    assert kept(apply_min_p(LOGITS, 0.7)) == [1]  # threshold 0.35
    assert kept(apply_min_p(LOGITS, 0.0)) == [0, 1, 2, 3]


def test_filter_order_temperature_first() -> None:
    # At T=0.5 the distribution sharpens to [.058, .645, .006, .232] (approx.), so top-p 0.6 keeps only id 1;
    # at T=1 it keeps ids 1 and 3. Temperature is applied before the filters.
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.6))) == [1, 3]
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=0.5, top_p=0.6))) == [1]
    np.testing.assert_allclose(filter_logits(LOGITS, SamplingParams(temperature=2.0)), LOGITS / 2)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2, seed=0), {1, 3}),
        (SamplingParams(temperature=1.0, top_p=0.7, seed=0), {1, 3}),
        (SamplingParams(temperature=1.0, min_p=0.2, seed=0), {0, 1, 3}),
        (SamplingParams(temperature=1.5, top_k=3, top_p=0.9, min_p=0.2, seed=0), {0, 1, 3}),
    ],
)
def test_samples_never_excluded_and_follow_distribution(params: SamplingParams, allowed: set[int]) -> None:
    rng = make_rng(params)
    draws = np.array([sample_numpy(LOGITS, params, rng) for _ in range(20_000)])
    assert set(draws.tolist()) == allowed
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, softmax(filter_logits(LOGITS, params)), atol=0.015)


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(3).standard_normal(1000)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)

    def run(p: SamplingParams) -> list[int]:
        rng = make_rng(p)
        return [sample_numpy(logits, p, rng) for _ in range(50)]

    assert run(params) == run(params)
    assert run(params) != run(SamplingParams(temperature=0.8, top_p=0.95, seed=1235))


def test_sample_rejects_batched_logits() -> None:
    with pytest.raises(ValueError, match=r"\[V\]"):
        sample_numpy(np.zeros((2, 4)), SamplingParams(temperature=1.0), np.random.default_rng(0))
