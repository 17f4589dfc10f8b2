"""Each backend against HF transformers' Llama4ForCausalLM on every tiny config (float32)."""

from __future__ import annotations

import numpy as np
import pytest
from hf_ref import hf_greedy, hf_logits, hf_model
from tiny import CONFIGS, random_weights

SEQ_LEN = 26  # spans positions of 4 chunks of 8 (3 chunk boundaries)
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest):
    """(name, args, weights, HF model, tokens [2, SEQ_LEN], HF logits) per config, built once."""
    args = CONFIGS[request.param]
    weights = random_weights(args, seed=3)
    model = hf_model(args, weights)
    assert model.config.no_rope_layers == [int(r) for r in args.rope_layers]
    assert model.config.attention_chunk_size == args.attention_chunk_size
    tokens = np.random.default_rng(7).integers(0, args.vocab_size, size=(2, SEQ_LEN))
    return request.param, args, weights, model, tokens, hf_logits(model, tokens)


def test_full_forward_matches_hf(backend, case) -> None:
    name, args, weights, _, tokens, ref = case
    got = backend.forward(backend.build(args, weights), tokens)
    assert got.shape == (2, SEQ_LEN, args.vocab_size) and got.dtype == np.float32
    diff = float(np.abs(got - ref).max())
    print(f"{backend.name} {name}: max |logit diff| vs HF = {diff:.3g}")
    assert diff < 1e-4, f"{name}: max |logit diff| {diff}"
    # The logits are far from trivial, so 1e-4 is a real constraint.
    assert np.abs(ref).max() > 1.0
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def greedy(backend, model, tokens: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding with the backend's cache: prefill, then one token per step."""
    cache = model.make_cache(batch_size=tokens.shape[0])
    logits = backend.forward(model, tokens, 0, cache)
    out, position = [], tokens.shape[1]
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1)[:, None]  # [B, 1]
        out.append(nxt)
        logits = backend.forward(model, nxt, position, cache)
        position += 1
    return np.concatenate(out, axis=1)  # [B, n]


def test_greedy_generation_matches_hf(backend, case) -> None:
    name, args, weights, model_hf, tokens, _ = case
    prompt = tokens[:, :11]
    expected = hf_greedy(model_hf, prompt, NEW_TOKENS)
    got = greedy(backend, backend.build(args, weights), prompt, NEW_TOKENS)
    np.testing.assert_array_equal(got, expected, err_msg=name)
