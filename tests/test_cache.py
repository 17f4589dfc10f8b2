"""Caches: any split of the input into cached calls gives the logits of one full forward.

The tiny model's RoPE layers attend within chunks of 8, so these runs cross several chunk
boundaries; its NoPE layer keeps every position.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny import CONFIGS, random_weights

TOL = 1e-4
CHUNK = 8


@pytest.fixture(scope="module", params=["dense_moe", "all_moe", "no_chunk"])
def setup(request: pytest.FixtureRequest):
    args = CONFIGS[request.param]
    tokens = np.random.default_rng(5).integers(0, args.vocab_size, size=(2, 10 * CHUNK + 5))
    return args, random_weights(args, seed=1), tokens


def run_in_steps(backend, model, tokens: np.ndarray, steps: list[int]) -> tuple[np.ndarray, list]:
    """Feed `tokens` [B, T] through one cache in calls of the given lengths; logits [B, T, V]."""
    cache = model.make_cache(batch_size=tokens.shape[0])
    out, position = [], 0
    for n in steps:
        out.append(backend.forward(model, tokens[:, position : position + n], position, cache))
        position += n
    assert position == tokens.shape[1]
    return np.concatenate(out, axis=1), cache


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    diff = float(np.abs(got - expected).max())
    assert diff < TOL, f"max |logit diff| {diff}"


def test_token_by_token_equals_full_forward(backend, setup) -> None:
    args, weights, tokens = setup
    model = backend.build(args, weights)
    tokens = tokens[:, : 3 * CHUNK + 4]  # 3 chunk boundaries
    got, _ = run_in_steps(backend, model, tokens, [1] * tokens.shape[1])
    assert_close(got, backend.forward(model, tokens))


def test_prompt_then_decode_equals_full_forward(backend, setup) -> None:
    args, weights, tokens = setup
    model = backend.build(args, weights)
    tokens = tokens[:, : 3 * CHUNK + 4]
    got, _ = run_in_steps(backend, model, tokens, [11] + [1] * (tokens.shape[1] - 11))
    assert_close(got, backend.forward(model, tokens))


@pytest.mark.parametrize("step", [3, 5])
def test_prefill_in_steps_equals_one_prefill(backend, setup, step: int) -> None:
    args, weights, tokens = setup
    model = backend.build(args, weights)
    prompt, total = 26, 29
    tokens = tokens[:, :total]
    steps = [step] * (prompt // step) + ([prompt % step] if prompt % step else [])
    stepped, _ = run_in_steps(backend, model, tokens, steps + [1] * (total - prompt))
    one, _ = run_in_steps(backend, model, tokens, [prompt] + [1] * (total - prompt))
    assert_close(stepped, one)  # including the decode steps after the prefill
    assert_close(one, backend.forward(model, tokens))


def test_long_decode_keeps_one_chunk(backend, setup) -> None:
    args, weights, tokens = setup
    model = backend.build(args, weights)
    got, cache = run_in_steps(backend, model, tokens, [3] + [1] * (tokens.shape[1] - 3))
    assert_close(got, backend.forward(model, tokens))
    for role, c in zip(args.layer_roles, cache, strict=True):
        assert c.offset == tokens.shape[1]
        if role.chunked:
            for arr in (c.keys, c.values):
                shape = backend.to_numpy(arr).shape
                assert shape == (2, args.n_kv_heads, args.attention_chunk_size, args.head_dim)
        else:
            assert backend.to_numpy(c.keys).shape[2] >= tokens.shape[1]
        assert c.nbytes > 0


def test_chunked_cache_returns_current_chunk(backend) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args))
    cache = model.make_cache(batch_size=1)[0]  # layer 0: chunked RoPE layer
    k = np.random.default_rng(0).standard_normal((1, 2, 20, 4)).astype(np.float32)  # [B, K, T, d]
    keys, values, k_start = cache.update_and_fetch(backend.from_numpy(k[:, :, :11]),
                                                   backend.from_numpy(-k[:, :, :11]))
    assert k_start == 0 and cache.offset == 11  # a long prefill returns every position it needs
    np.testing.assert_array_equal(backend.to_numpy(keys), k[:, :, :11])
    keys, values, k_start = cache.update_and_fetch(backend.from_numpy(k[:, :, 11:12]),
                                                   backend.from_numpy(-k[:, :, 11:12]))
    assert k_start == CHUNK  # positions 8..11: the current chunk only
    np.testing.assert_array_equal(backend.to_numpy(keys), k[:, :, 8:12])
    np.testing.assert_array_equal(backend.to_numpy(values), -k[:, :, 8:12])
    keys, _, k_start = cache.update_and_fetch(backend.from_numpy(k[:, :, 12:20]),
                                              backend.from_numpy(-k[:, :, 12:20]))
    assert k_start == CHUNK and cache.offset == 20  # 8..19 returned, 16..19 kept in slots 0..3
    np.testing.assert_array_equal(backend.to_numpy(keys), k[:, :, 8:20])
    np.testing.assert_array_equal(backend.to_numpy(cache.keys)[:, :, :4], k[:, :, 16:20])


def test_position_must_equal_cache_offset(backend) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args))
    cache = model.make_cache(batch_size=1)
    backend.forward(model, np.array([[1, 2, 3]]), 0, cache)
    with pytest.raises(ValueError, match="offset"):
        backend.forward(model, np.array([[4]]), 2, cache)


def test_input_beyond_max_seq_len_raises(backend) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args))
    with pytest.raises(ValueError, match=str(args.max_seq_len)):
        backend.forward(model, np.zeros((1, args.max_seq_len + 1), dtype=np.int64))
    cache = model.make_cache(batch_size=1)
    backend.forward(model, np.zeros((1, args.max_seq_len - 2), dtype=np.int64), 0, cache)
    with pytest.raises(ValueError, match=str(args.max_seq_len)):
        backend.forward(model, np.zeros((1, 3), dtype=np.int64), args.max_seq_len - 2, cache)
