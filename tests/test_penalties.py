"""Repetition controls: `repetition_penalty` equal to transformers' logits processor (and its greedy
generate), OpenAI's frequency and presence penalties, on both backends, alone and per row in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from byte_tokenizer import ByteTokenizer
from hf_ref import hf_model
from test_batch_generator import PROMPTS, run
from tiny import CONFIGS, random_weights

from common.penalties import PenaltyBatch, PenaltyTracker, apply_penalties_numpy
from common.sampling import SamplingParams

V = 128


def _backend_apply(backend, logits: np.ndarray, batch: PenaltyBatch) -> np.ndarray:
    if backend.name == "mlx":
        from mlx_llm.sample import apply_penalties
    else:
        from torch_backend.sample import apply_penalties
    return backend.to_numpy(apply_penalties(backend.from_numpy(logits), batch))


def test_repetition_penalty_equals_transformers_processor_per_row(backend) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, V)) * 3).astype(np.float32)
    histories = [rng.integers(0, V, 20).tolist(), [], rng.integers(0, V, 7).tolist()]
    penalties = [1.3, 1.1, 0.7]
    trackers = []
    for h, p in zip(histories, penalties, strict=True):
        t = PenaltyTracker(SamplingParams(repetition_penalty=p), h[:10])
        for token in h[10:]:
            t.add(token)
        trackers.append(t)
    batch = PenaltyBatch.of(trackers)
    want = logits.copy()
    for i, (h, p) in enumerate(zip(histories, penalties, strict=True)):
        if h:
            want[i] = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([h]), torch.from_numpy(logits[i : i + 1]))[0]
    np.testing.assert_allclose(apply_penalties_numpy(logits, batch), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_backend_apply(backend, logits, batch), want, atol=1e-6, rtol=0)


def test_frequency_and_presence_penalties_follow_openai(backend) -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, V)).astype(np.float32)
    prompt, generated = [4, 4, 9], [9, 9, 17, 4, 17, 9]
    t = PenaltyTracker(SamplingParams(frequency_penalty=0.5, presence_penalty=0.3), prompt)
    for token in generated:
        t.add(token)
    batch = PenaltyBatch.of([None, t])
    want = logits.copy()
    for token in set(generated):  # counts of generated tokens only, as OpenAI's API
        want[1, token] -= generated.count(token) * 0.5 + 0.3
    np.testing.assert_allclose(apply_penalties_numpy(logits, batch), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_backend_apply(backend, logits, batch), want, atol=1e-6, rtol=0)
    assert PenaltyBatch.of([None, PenaltyTracker(SamplingParams(frequency_penalty=0.5), [1, 2])]) is None


def test_greedy_generation_with_repetition_penalty_equals_transformers_generate(backend) -> None:
    args = CONFIGS["dense_moe"]
    weights = random_weights(args, seed=7)
    prompt = PROMPTS[1]
    hf = hf_model(args, weights)
    hf.generation_config.eos_token_id = []
    with torch.inference_mode():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, repetition_penalty=1.3, pad_token_id=0)[0, len(prompt):]
    model = backend.build(args, weights)
    steps = backend.module.generate_step(model, prompt, SamplingParams(repetition_penalty=1.3))
    got = [next(steps) for _ in range(24)]
    assert got == want.tolist()
    plain = backend.module.generate_step(model, prompt)
    assert [next(plain) for _ in range(24)] != got  # the penalty changed the text


def test_penalized_rows_in_a_batch_equal_their_solo_runs(backend) -> None:
    args = CONFIGS["dense_moe"]
    model = backend.build(args, random_weights(args, seed=4))
    params = [SamplingParams(repetition_penalty=1.4), SamplingParams(),
              SamplingParams(temperature=0.9, seed=3, frequency_penalty=0.8, presence_penalty=0.4)]
    solo = []
    for p, s in zip(PROMPTS, params, strict=False):
        steps = backend.module.generate_step(model, p, s)
        solo.append([next(steps) for _ in range(20)])
    gen = backend.module.BatchGenerator(model, ByteTokenizer(), max_batch=4)
    uids = [gen.insert(p, 20, s) for p, s in zip(PROMPTS, params, strict=False)]
    tokens, _, _ = run(gen)
    assert [tokens[u] for u in uids] == solo


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": "2"}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
])
def test_penalty_values_are_checked(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
