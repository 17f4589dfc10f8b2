"""Continuous batching: rows that join mid-flight, leave (stop token, stop string, max_tokens,
`remove`), sample with seeds or ask for log-probabilities get exactly their solo runs' tokens, and
the other rows are untouched. Tiny dense+MoE model, chunk 8, one NoPE layer, float32."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from byte_tokenizer import ByteTokenizer
from tiny import CONFIGS, random_weights

from common.generation import ContextLengthError
from common.sampling import SamplingParams

ARGS = CONFIGS["dense_moe"]
RNG = np.random.default_rng(21)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (3, 17, 40, 70)]


@pytest.fixture
def model(backend):
    return backend.build(ARGS, random_weights(ARGS, seed=4))


def solo(backend, model, prompt: list[int], n: int, sampling: SamplingParams | None = None) -> list[int]:
    steps = backend.module.generate_step(model, prompt, sampling)
    return [next(steps) for _ in range(n)]


def run(gen, schedule: dict | None = None, limit: int = 400) -> tuple[dict, dict, list[set]]:
    """Step until idle, calling schedule[step](gen) first; tokens and final events by uid, uids per step."""
    tokens, ends, per_step = defaultdict(list), {}, []
    for i in range(limit):
        if schedule and i in schedule:
            schedule[i](gen)
        events = gen.step()
        per_step.append({e.uid for e in events if e.token is not None})
        for e in events:
            if e.token is not None:
                tokens[e.uid].append(e.token)
            if e.finish_reason is not None:
                ends[e.uid] = e
        if gen.idle and not (schedule and any(k > i for k in schedule)):
            return tokens, ends, per_step
    raise AssertionError("the generator did not finish")


def test_rows_join_and_leave_without_changing_other_rows(backend, model) -> None:
    ref = [solo(backend, model, p, 64) for p in PROMPTS]
    stop_id = ref[2][20]
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), max_batch=8, prefill_step_size=16)
    uids = {0: gen.insert(PROMPTS[0], max_tokens=64), 1: gen.insert(PROMPTS[1], max_tokens=64)}
    schedule = {
        10: lambda g: uids.__setitem__(2, g.insert(PROMPTS[2], max_tokens=64, stop=[stop_id])),
        25: lambda g: uids.__setitem__(3, g.insert(PROMPTS[3], max_tokens=30)),
        40: lambda g: g.remove(uids[1]),
    }
    tokens, ends, per_step = run(gen, schedule)
    assert tokens[uids[0]] == ref[0] and ends[uids[0]].finish_reason == "length"
    first_stop = ref[2].index(stop_id)
    assert tokens[uids[2]] == ref[2][: first_stop + 1] and ends[uids[2]].finish_reason == "stop"
    assert ends[uids[2]].text == ""  # the stop token's own text is not returned
    assert tokens[uids[3]] == ref[3][:30] and ends[uids[3]].finish_reason == "length"
    cancelled = tokens[uids[1]]
    assert cancelled == ref[1][: len(cancelled)] and len(cancelled) < 64 and uids[1] not in ends
    # while the 70-token prompt prefilled in steps of 16, the running rows got a token at every step
    joined = next(i for i, s in enumerate(per_step) if uids[3] in s)
    assert joined - 25 >= 70 // 16
    assert all(uids[0] in s for s in per_step[25:joined])


def test_seeded_rows_sample_as_they_do_alone(backend, model) -> None:
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=5), SamplingParams(),
              SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=6), SamplingParams(temperature=0.7, seed=7)]
    ref = [solo(backend, model, p, 24, s) for p, s in zip(PROMPTS, params, strict=True)]
    assert ref[0] != solo(backend, model, PROMPTS[0], 24, SamplingParams(temperature=0.9, top_p=0.9, seed=8))
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), max_batch=4, prefill_step_size=32)
    uids = [gen.insert(PROMPTS[0], 24, params[0]), gen.insert(PROMPTS[1], 24, params[1])]
    schedule = {3: lambda g: uids.append(g.insert(PROMPTS[2], 24, params[2])),
                7: lambda g: uids.append(g.insert(PROMPTS[3], 24, params[3]))}
    tokens, _, _ = run(gen, schedule)
    assert [tokens[u] for u in uids] == ref


def test_stop_strings_across_tokens_and_text_segments(backend, model) -> None:
    ref = solo(backend, model, PROMPTS[1], 40)
    text = bytes(ref).decode("ascii")
    stop = text[12:14]  # two characters: two tokens of the byte tokenizer
    gen = backend.module.BatchGenerator(model, ByteTokenizer())
    uid = gen.insert(PROMPTS[1], 40, stop=[stop, "\x00never"])
    other = gen.insert(PROMPTS[0], 40)
    tokens, ends, _ = run(gen)
    texts = defaultdict(str)
    gen2 = backend.module.BatchGenerator(model, ByteTokenizer())
    uid2 = gen2.insert(PROMPTS[1], 40, stop=[stop])
    for _ in range(60):
        for e in gen2.step():
            texts[e.uid] += e.text
    assert ends[uid].finish_reason == "stop" and texts[uid2] == text[: text.find(stop)]
    assert tokens[other] == solo(backend, model, PROMPTS[0], 40)


def test_logprobs_equal_the_models_log_softmax(backend, model) -> None:
    ref = solo(backend, model, PROMPTS[1], 12)
    logits = backend.forward(model, np.array([PROMPTS[1] + ref]))[0, len(PROMPTS[1]) - 1 : -1]  # [12, V]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    gen = backend.module.BatchGenerator(model, ByteTokenizer())
    uid = gen.insert(PROMPTS[1], 12, logprobs=3)
    plain = gen.insert(PROMPTS[2], 12)
    events = [e for _ in range(40) for e in gen.step()]
    mine = [e for e in events if e.uid == uid]
    assert [e.token for e in mine] == ref
    for i, e in enumerate(mine):
        assert abs(e.logprob - logp[i, ref[i]]) < 1e-4
        ids = [t for t, _ in e.top_logprobs]
        assert ids == np.argsort(-logp[i], kind="stable")[:3].tolist()
        np.testing.assert_allclose([v for _, v in e.top_logprobs], logp[i, ids], atol=1e-4)
    assert all(e.logprob is None and e.top_logprobs == () for e in events if e.uid == plain)


def test_bad_requests_fail_alone(backend, model) -> None:
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), max_batch=4)
    good = gen.insert(PROMPTS[1], 20)
    first = [e.token for e in gen.step()]  # prefilled: the first token
    for bad, match in [(dict(prompt_ids=[]), "empty prompt"), (dict(prompt_ids=[1] * ARGS.max_seq_len), "context"),
                       (dict(prompt_ids=[1, 2], sampling="hot"), "SamplingParams"),
                       (dict(prompt_ids=[1, 2], max_tokens=0), "max_tokens"),
                       (dict(prompt_ids=[1, 2], logprobs=99), "logprobs"),
                       (dict(prompt_ids=[1, 2], stop=[3.5]), "stop")]:
        with pytest.raises(ValueError, match=match):
            gen.insert(**bad)
    with pytest.raises(ContextLengthError):
        gen.insert([1] * (ARGS.max_seq_len + 3))
    tokens, _, _ = run(gen)
    assert first + tokens[good] == solo(backend, model, PROMPTS[1], 20)


def test_rings_stay_one_chunk_and_removing_rows_frees_memory(backend, model) -> None:
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), max_batch=4)
    uids = [gen.insert(p, 200) for p in PROMPTS]
    for _ in range(120):
        gen.step()
    assert gen.counts["running"] == 4
    for role, c in zip(ARGS.layer_roles, gen._cache, strict=True):
        if role.chunked:
            assert c.keys.shape[2] == ARGS.attention_chunk_size  # [B, K, C, d] after 100+ decode steps
    before = gen.cache_nbytes
    gen.remove(uids[3])
    gen.remove(uids[0])
    assert gen.cache_nbytes < before * 0.6
    gen.step()
    assert gen.counts["running"] == 2


def test_batch_generate_returns_one_result_per_prompt(backend, model) -> None:
    tok = ByteTokenizer()
    prompts = ["hello", PROMPTS[2], "a longer prompt, crossing chunks"]
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams()]
    results = backend.module.batch_generate(model, tok, prompts, max_tokens=10, sampling=params)
    for p, s, r in zip(prompts, params, results, strict=True):
        ids = tok.encode(p) if isinstance(p, str) else p
        want = solo(backend, model, ids, 10, s)
        assert r.tokens == want and r.text == tok.decode(want)
        assert (r.finish_reason, r.prompt_tokens, r.generation_tokens) == ("length", len(ids), 10)
    with pytest.raises(ValueError, match="3 prompts need 3"):
        backend.module.batch_generate(model, tok, prompts, sampling=params[:2])
