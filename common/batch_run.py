"""`batch_generate`'s loop, shared by both backends: every prompt through a `BatchGenerator`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.batch_generator import BatchGenerator
from common.datatypes import BatchEvent, BatchResult
from common.sampling import SamplingParams


def run_batch(gen: BatchGenerator, prompts: Sequence[str | Sequence[int]], max_tokens: int,
              sampling: SamplingParams | Sequence[SamplingParams] | None,
              images: Sequence[Sequence[Any] | None] | None) -> list[BatchResult]:
    """`batch_generate`'s loop: every prompt through `gen`, one result per prompt, in order."""
    n = len(prompts)
    params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
    pics = [None] * n if images is None else list(images)
    if len(params) != n or len(pics) != n:
        raise ValueError(f"batch_generate: {n} prompts need {n} sampling parameters and {n} image lists, "
                         f"got {len(params)} and {len(pics)}")
    uids = [gen.insert(p, max_tokens, s, i) for p, s, i in zip(prompts, params, pics, strict=True)]
    texts: dict[int, list[str]] = {u: [] for u in uids}
    tokens: dict[int, list[int]] = {u: [] for u in uids}
    ends: dict[int, BatchEvent] = {}
    while len(ends) < n:
        for e in gen.step():
            texts[e.uid].append(e.text)
            if e.token is not None:
                tokens[e.uid].append(e.token)
            if e.finish_reason is not None:
                ends[e.uid] = e
    for e in ends.values():
        if e.finish_reason == "error":
            raise ValueError(f"batch_generate: prompt {uids.index(e.uid)}: {e.error}")
    return [BatchResult(text="".join(texts[u]), tokens=tokens[u], finish_reason=ends[u].finish_reason or "",
                        prompt_tokens=ends[u].prompt_tokens, generation_tokens=ends[u].generation_tokens,
                        cached_tokens=ends[u].cached_tokens) for u in uids]
