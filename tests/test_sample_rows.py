"""The backends' batched samplers follow the shared reference draw row by row: per-row parameters,
per-row uniform numbers, greedy rows beside sampled ones."""

from __future__ import annotations

import numpy as np

from common.sampling import RowRandom, SamplingBatch, SamplingParams, sample_with_uniform, seeded_uniform

PARAMS = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5),
          SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9, min_p=0.1),
          SamplingParams(temperature=1.1, top_k=40, top_p=0.95, min_p=0.02)]


def _sample(backend, logits: np.ndarray, params: list[SamplingParams], u: np.ndarray) -> list[int]:
    if backend.name == "mlx":
        from mlx_llm.sample import sample_rows
    else:
        from torch_backend.sample import sample_rows
    return np.asarray(backend.to_numpy(sample_rows(backend.from_numpy(logits), SamplingBatch.of(params), u))).astype(
        int).tolist()


def test_batched_draws_equal_the_reference(backend) -> None:
    rng = np.random.default_rng(0)
    agree = total = 0
    for _ in range(30):
        logits = (rng.standard_normal((len(PARAMS), 300)) * 3).astype(np.float32)
        u = rng.random(len(PARAMS))
        got = _sample(backend, logits, PARAMS, u)
        want = [sample_with_uniform(logits[i], p, u[i]) for i, p in enumerate(PARAMS)]
        agree += sum(g == w for g, w in zip(got, want, strict=True))
        total += len(PARAMS)
    assert agree == total


def test_greedy_rows_take_the_argmax_and_extremes_stay_in_range(backend) -> None:
    logits = np.full((3, 10), -5.0, dtype=np.float32)
    logits[:, 3] = 4.0
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=2.0, top_p=0.01)]
    for u in (0.0, 0.5, 1.0 - 2**-53):
        assert _sample(backend, logits, params, np.full(3, u)) == [3, 3, 3]


def test_seeded_uniforms_are_a_pure_function_of_seed_and_index() -> None:
    a, b = RowRandom(7), RowRandom(7)
    draws = [a.next() for _ in range(100)]
    assert draws == [b.next() for _ in range(100)] == [seeded_uniform(7, i) for i in range(100)]
    assert all(0 <= x < 1 for x in draws) and len(set(draws)) == 100
    assert draws != [seeded_uniform(8, i) for i in range(100)]
    assert abs(np.mean([seeded_uniform(1, i) for i in range(20_000)]) - 0.5) < 0.01


def test_torch_greedy_ids_are_torchs_argmax_ties_and_nans_first() -> None:
    """`greedy_ids` (numpy's argmax for float32 CPU logits): torch's argmax, first id on ties and on NaNs,
    strided rows too, int64 ids; other dtypes go through torch."""
    torch = __import__("pytest").importorskip("torch")
    from torch_backend.sample import greedy_ids

    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    x[1, 40] = x[1, 7] = 50.0  # a tie: the first
    x[2, 90] = x[2, 30] = float("nan")  # NaNs win, the first of them
    x[3] = float("-inf")  # all -inf: id 0
    for logits in (x, x[:, ::3], x.bfloat16()):
        got = greedy_ids(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))
    assert greedy_ids(x).tolist()[1:] == [7, 30, 0]
