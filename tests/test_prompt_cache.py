"""Prompt cache: a request that extends a cached prefix prefills only the rest and generates what a
cold run does; entries past the chunk ring fall back to a chunk boundary; an LRU bounded in bytes."""

from __future__ import annotations

import numpy as np
import pytest
from byte_tokenizer import ByteTokenizer
from test_batch_generator import ARGS, run, solo
from tiny import random_weights

from common.prompt_cache import PromptCache, reachable_prefix

C = ARGS.attention_chunk_size
RNG = np.random.default_rng(31)
SYSTEM = RNG.integers(0, 128, 20).tolist()  # longer than two chunks


@pytest.fixture
def model(backend):
    return backend.build(ARGS, random_weights(ARGS, seed=4))


def counting(gen) -> list[int]:
    """Wrap the generator's prefill so each call's real token count is recorded."""
    counts, inner = [], gen.ops.prefill

    def prefill(caches, chunks, starts, images):
        counts.append(sum(len(c) for c in chunks))
        return inner(caches, chunks, starts, images)

    gen.ops.prefill = prefill
    return counts


def test_shared_system_prompt_prefills_only_new_tokens(backend, model) -> None:
    first, second = SYSTEM + [1, 2, 3], SYSTEM + [9, 8, 7, 6]
    cache = PromptCache(1 << 30)
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), prompt_cache=cache)
    counts = counting(gen)
    uid = gen.insert(first, 6)
    run(gen)
    assert sum(counts) == len(first) and len(cache) == 2  # the prompt, then prompt + generated
    counts.clear()
    uid = gen.insert(second, 16)
    tokens, ends, _ = run(gen)
    assert sum(counts) == 4 and ends[uid].cached_tokens == len(SYSTEM)
    assert tokens[uid] == solo(backend, model, second, 16)


def test_next_chat_turn_continues_from_the_finished_row(backend, model) -> None:
    cache = PromptCache(1 << 30)
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), prompt_cache=cache)
    counts = counting(gen)
    uid = gen.insert(SYSTEM, 9)
    tokens, _, _ = run(gen)
    turn = SYSTEM + tokens[uid] + [5, 4, 3]
    counts.clear()
    uid = gen.insert(turn, 12)
    tokens, ends, _ = run(gen)
    # everything fed before (the prompt and all generated tokens but the last) comes from the cache
    assert ends[uid].cached_tokens == len(SYSTEM) + 8 and sum(counts) == 4
    assert tokens[uid] == solo(backend, model, turn, 12)
    uid = gen.insert(turn, 12)  # the very same prompt: all but its last token come from the cache
    tokens, ends, _ = run(gen)
    assert ends[uid].cached_tokens == len(turn) - 1 and tokens[uid] == solo(backend, model, turn, 12)


def test_entry_past_the_ring_falls_back_to_a_chunk_boundary(backend, model) -> None:
    long = RNG.integers(0, 128, 30).tolist()
    caches = model.make_cache(1)
    backend.forward(model, np.array([long]), 0, caches)
    cache = PromptCache(1 << 30)
    cache.insert(long, caches)
    request = long[:21] + [7, 7, 7]
    # position 21's chunk (16..23) is no longer in the ring, which holds 24..29: back to 16
    assert reachable_prefix(caches, 21) == 2 * C and reachable_prefix(caches, 26) == 26
    got, n = cache.fetch(request)
    assert n == 2 * C and got[0].offsets[0] == 2 * C
    rest = backend.forward(model, np.array([request[n:]]), n, got)[0, -1]
    cold = backend.forward(model, np.array([request]))[0, -1]
    assert float(np.abs(rest - cold).max()) < 1e-4
    assert cache.hits == 1 and cache.cached_tokens == 2 * C


def test_lru_stays_within_its_byte_budget(backend, model) -> None:
    entries = []
    for n in (12, 13, 14):
        tokens = RNG.integers(0, 128, n).tolist()
        caches = model.make_cache(1)
        backend.forward(model, np.array([tokens]), 0, caches)
        entries.append((tokens, caches))
    size = sum(c.nbytes for c in entries[0][1])
    cache = PromptCache(int(size * 2.5))
    cache.insert(*entries[0])
    cache.insert(*entries[1])
    assert cache.fetch(entries[0][0] + [1])[1] == 12  # a hit makes entry 0 the most recently used
    cache.insert(*entries[2])  # over budget: entry 1, the least recently used, goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.fetch(entries[1][0] + [1]) == (None, 0) and cache.misses == 1
    assert cache.fetch(entries[0][0] + [1])[1] == 12
    with pytest.raises(ValueError, match="exactly 5 positions"):
        cache.insert([1, 2, 3, 4, 5], entries[0][1])
