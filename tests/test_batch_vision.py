"""A batch with an image prompt and a text prompt gives each its solo run's tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from test_vision import ARGS
from test_vision import vision_weights as make_weights
from test_vision_load import _pictures, _tokenizer_folder

from common.prompt_cache import PromptCache
from common.sampling import SamplingParams


def test_image_and_text_rows_equal_their_solo_runs(backend, tmp_path: Path) -> None:
    tok = _tokenizer_folder(tmp_path)
    args = dataclasses.replace(ARGS, vocab_size=tok.vocab_size)
    model = backend.build(args, make_weights(args, seed=9))
    images = _pictures(tmp_path)
    greedy = SamplingParams()
    mod = backend.module
    solo_image = [r.token for r in mod.stream_generate(model, tok, "Hi", 6, greedy, images=images)]
    solo_text = [r.token for r in mod.stream_generate(model, tok, "Hello there", 6, greedy)]
    results = mod.batch_generate(model, tok, ["Hi", "Hello there"], max_tokens=6, images=[images, None],
                                 prefill_step_size=5)  # image rows split across prefill steps
    assert [r.tokens for r in results] == [solo_image[: len(results[0].tokens)], solo_text[: len(results[1].tokens)]]
    assert len(results[0].tokens) == len(solo_image) and len(results[1].tokens) == len(solo_text)
    # image prompts are not shared through the prompt cache beyond their first image
    gen = mod.BatchGenerator(model, tok, prompt_cache=PromptCache(1 << 30))
    for _ in range(2):
        uid = gen.insert("Hi", 6, images=images[::-1])
        ends = [e for _ in range(40) for e in gen.step() if e.finish_reason]
        assert ends[0].uid == uid and ends[0].cached_tokens == 0
