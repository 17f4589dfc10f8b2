"""Backend-neutral half of generation: prompt checks, stop rules, streaming text and statistics.

Each backend supplies `generate_step` (an iterator of token ids, one model call per token after
the prefill); this module turns those ids into `GenerationResponse` records.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from common.datatypes import GenerationResponse
from common.detokenizer import StreamingDetokenizer
from common.tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context."""


def encode_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """A string is encoded with BOS (no chat template: the caller decides); ids pass through."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=True, eos=False)
    return [int(t) for t in prompt]


def check_prompt(prompt: Sequence[int], max_seq_len: int, cache_offset: int = 0) -> None:
    if not prompt:
        raise ValueError("empty prompt: at least one token is needed")
    if cache_offset + len(prompt) >= max_seq_len:
        raise ContextLengthError(
            f"prompt of {len(prompt)} tokens (after {cache_offset} cached) does not fit the model's "
            f"context of {max_seq_len} tokens")


def process_peak_memory_gb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 30) if sys.platform == "darwin" else peak / (1 << 20)


def stream_responses(
    steps: Iterator[int],
    tokenizer: Tokenizer,
    prompt_len: int,
    max_tokens: int,
    room: int,
    peak_memory_gb: Callable[[], float] = process_peak_memory_gb,
) -> Iterator[GenerationResponse]:
    """Responses for the tokens of `steps`; stops at a stop token, `max_tokens` or `room` (context left).

    The first token's arrival ends the prefill clock; the stop token itself is not printed.
    """
    detok = StreamingDetokenizer(tokenizer)
    stops = set(tokenizer.stop_tokens)
    limit = min(max_tokens, room)
    tic = time.perf_counter()
    prompt_tps, gen_start = 0.0, tic
    for n, token in enumerate(steps, start=1):
        if n == 1:
            gen_start = time.perf_counter()
            prompt_tps = prompt_len / max(gen_start - tic, 1e-9)
        finish = "stop" if token in stops else ("length" if n >= limit else None)
        if finish != "stop":
            detok.add_token(token)
        if finish is not None:
            detok.finalize()
        elapsed = time.perf_counter() - gen_start
        yield GenerationResponse(
            text=detok.last_segment, token=token, prompt_tokens=prompt_len, prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=peak_memory_gb(), finish_reason=finish)
        if finish is not None:
            return
