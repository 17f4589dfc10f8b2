"""Rows at their own positions: a batch of prompts of different lengths, right-padded, prefilled
together and decoded together, gives each row the numbers of its solo run (and of transformers).

Chunk size 8 and prompt lengths 3, 17, 40 and 70, so rows cross chunk boundaries at different steps;
layer 3 is a NoPE layer with temperature tuning.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_ref import hf_greedy, hf_logits, hf_model
from tiny import CONFIGS, random_weights

TOL = 1e-4
LENGTHS = [3, 17, 40, 70]
STEPS = 64


def padded(prompts: list[np.ndarray], fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, L] and lengths [B]."""
    lengths = np.array([len(p) for p in prompts])
    tokens = np.full((len(prompts), lengths.max()), fill, dtype=np.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


@pytest.fixture(scope="module", params=["dense_moe", "all_moe"])
def fixture(request: pytest.FixtureRequest):
    """Args, weights, prompts, and transformers' logits and greedy tokens for each prompt alone."""
    args = CONFIGS[request.param]
    weights = random_weights(args, seed=3)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, args.vocab_size, n) for n in LENGTHS]
    hf = hf_model(args, weights)
    logits = [hf_logits(hf, p[None])[0] for p in prompts]
    greedy = [hf_greedy(hf, p[None], STEPS)[0] for p in prompts]
    return args, weights, prompts, logits, greedy


def max_row_diff(batch_logits: np.ndarray, lengths: np.ndarray, solo: list[np.ndarray]) -> float:
    return max(float(np.abs(batch_logits[i, :n] - solo[i]).max()) for i, n in enumerate(lengths))


def test_ragged_forward_without_cache_equals_solo(backend, fixture) -> None:
    args, weights, prompts, hf, _ = fixture
    model = backend.build(args, weights)
    tokens, lengths = padded(prompts)
    got = backend.forward(model, tokens, np.zeros(4, np.int64), lengths=lengths)
    assert max_row_diff(got, lengths, hf) < TOL
    solo = [backend.forward(model, p[None])[0] for p in prompts]
    assert max_row_diff(got, lengths, solo) < TOL


def test_ragged_prefill_then_rows_decode_equal_solo_runs(backend, fixture) -> None:
    """One ragged prefill, then 64 decode steps with every row at its own position."""
    args, weights, prompts, hf, hf_tokens = fixture
    model = backend.build(args, weights)
    tokens, lengths = padded(prompts)
    cache = model.make_cache(len(prompts))
    logits = backend.forward(model, tokens, np.zeros(4, np.int64), cache, lengths=lengths)
    assert max_row_diff(logits, lengths, hf) < TOL
    solo_caches = [model.make_cache(1) for _ in prompts]
    for p, c in zip(prompts, solo_caches, strict=True):
        backend.forward(model, p[None], 0, c)
    last = logits[np.arange(4), lengths - 1]  # [B, V]
    got, positions, worst = [], lengths.copy(), 0.0
    for _ in range(STEPS):
        step = last.argmax(-1)
        got.append(step)
        last = backend.forward(model, step[:, None], positions, cache)[:, 0]
        solo_last = np.stack([backend.forward(model, step[i : i + 1, None], int(positions[i]), c)[0, -1]
                              for i, c in enumerate(solo_caches)])
        worst = max(worst, float(np.abs(last - solo_last).max()))
        positions = positions + 1
    assert worst < TOL, f"max |batch - solo| over {STEPS} steps: {worst}"
    np.testing.assert_array_equal(np.stack(got, axis=1), np.stack(hf_tokens))
    assert (cache[0].offsets == lengths + STEPS).all()


def test_padding_never_reaches_the_cache(backend) -> None:
    """Other padding values change nothing beyond rounding (batched products group rows differently),
    and no slot past a row's real positions is ever written."""
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args, seed=3))
    prompts = [np.arange(5) + 1, np.arange(13) + 7]
    outs = []
    for fill in (0, 99):
        tokens, lengths = padded(prompts, fill)
        cache = model.make_cache(2)
        backend.forward(model, tokens, 0, cache, lengths=lengths)
        for role, c in zip(args.layer_roles, cache, strict=True):
            keys = backend.to_numpy(c.keys)  # [B, K, S, d]
            held = 5 % args.attention_chunk_size if role.chunked else 5  # row 0's real positions in this cache
            assert not keys[0, :, held:].any(), "a padding position reached the cache"
        outs.append(backend.forward(model, np.array([[3], [4]]), lengths, cache))
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)


def test_caches_merge_select_filter_and_rewind_rows(backend) -> None:
    """Rows prefilled alone and merged decode as a batch; a selected row continues alone; a filtered
    cache frees memory; a per-row rewind replays to the same logits."""
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args, seed=3))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, args.vocab_size, n) for n in (6, 21, 30)]
    singles = [model.make_cache(1) for _ in prompts]
    for p, c in zip(prompts, singles, strict=True):
        backend.forward(model, p[None], 0, c)
    merged = backend.merge_caches(singles)
    positions = np.array([len(p) for p in prompts])
    assert (merged[0].offsets == positions).all() and merged[0].batch_size == 3
    step = np.array([[5], [6], [7]])
    batch = backend.forward(model, step, positions, merged)[:, 0]
    for i, c in enumerate(singles):
        alone = backend.forward(model, step[i : i + 1], int(positions[i]), c)[0, 0]
        assert float(np.abs(batch[i] - alone).max()) < TOL
    # rewind row 1 by one position (the others stay) and replay its token
    for c in merged:
        c.rewind([0, 1, 0])
    assert merged[0].offsets.tolist() == (positions + [1, 0, 1]).tolist()
    one = [c.select([1]) for c in merged]
    again = backend.forward(model, step[1:2], int(positions[1]), one)[0, 0]
    assert float(np.abs(again - batch[1]).max()) < TOL
    before = sum(c.nbytes for c in merged)
    for c in merged:
        c.filter([0, 2])
    assert sum(c.nbytes for c in merged) < before and merged[0].batch_size == 2
    with pytest.raises(ValueError, match="offsets"):
        backend.forward(model, step[:2], positions[[0, 2]], merged)  # rows 0 and 2 have moved on


def test_ring_holds_one_chunk_per_row_after_long_decodes(backend) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args, seed=3))
    tokens, lengths = padded([np.arange(3) + 1, np.arange(11) + 1])
    cache = model.make_cache(2)
    backend.forward(model, tokens, 0, cache, lengths=lengths)
    positions = lengths.copy()
    for _ in range(5 * args.attention_chunk_size):
        backend.forward(model, np.array([[1], [2]]), positions, cache)
        positions += 1
    for role, c in zip(args.layer_roles, cache, strict=True):
        if role.chunked:
            assert c.keys.shape[2] == args.attention_chunk_size  # [B, K, C, d]


@pytest.mark.parametrize(("position", "lengths", "match"), [
    (np.array([0, 1]), None, "tokens_position"),
    (np.array([0]), None, "one start per row"),
    (np.array([-1, 0]), None, ">= 0"),
    (0, np.array([0, 3]), "lengths"),
    (0, np.array([4, 3]), "lengths"),
    (np.array([0, 510]), None, "max_seq_len"),
])
def test_bad_rows_give_clear_errors(backend, position, lengths, match: str) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args, seed=3))
    cache = model.make_cache(2) if match == "tokens_position" else None
    with pytest.raises(ValueError, match=match):
        backend.forward(model, np.ones((2, 3), np.int64), position, cache, lengths=lengths)
