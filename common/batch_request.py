"""One request in a batch: its prompt, limits and stop rules, and what it has generated so far.

The scheduler (`common.batch_generator`) moves rows from waiting to prefilling to running; this
module turns each sampled token into the row's `BatchEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.datatypes import BatchEvent
from common.detokenizer import StreamingDetokenizer
from common.image_prompt import PromptImages
from common.penalties import PenaltyTracker, uses_penalties
from common.sampling import RowRandom, SamplingParams
from common.stop_text import StopText

MAX_LOGPROBS = 20


@dataclass(eq=False)
class Row:
    uid: int
    prompt: list[int]
    images: PromptImages | None
    limit: int  # tokens this row may generate: max_tokens, or less where the context ends first
    sampling: SamplingParams
    logprobs: int
    stop_ids: frozenset[int]
    detok: StreamingDetokenizer
    stop_text: StopText
    random: RowRandom = field(init=False)
    penalties: PenaltyTracker | None = field(init=False)
    cache: list | None = None  # its own single-row caches while prefilling
    done: int = 0  # prompt tokens in the cache
    cached: int = 0  # of those, taken from the prompt cache
    table: Any = None  # image features, while prefilling
    generated: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.random = RowRandom(self.sampling.seed)
        self.penalties = PenaltyTracker(self.sampling, self.prompt) if uses_penalties(self.sampling) else None

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.prompt) - self.done

    @property
    def position(self) -> int:
        """Where the last generated token goes when it is fed back (the cache holds the positions before)."""
        return len(self.prompt) + len(self.generated) - 1

    @property
    def cacheable(self) -> int:
        """How much of the prompt may be shared through the prompt cache: all of it, or the part before
        its first image (image patches are the same token ids whatever the image)."""
        return len(self.prompt) if self.images is None or not self.images.n_rows else int(self.images.positions.min())

    def accept(self, token: int, logprob: float | None = None,
               top: tuple[tuple[int, float], ...] = ()) -> BatchEvent:
        """Record a sampled token and say what it means for the row."""
        self.generated.append(token)
        if self.penalties is not None:
            self.penalties.add(token)
        n = len(self.generated)
        finish = None
        if token in self.stop_ids:
            finish, text = "stop", ""
        else:
            self.detok.add_token(token)
            text, hit = self.stop_text.feed(self.detok.last_segment)
            if hit:
                finish = "stop"
            elif n >= self.limit:
                finish = "length"
        if (finish == "stop" and token in self.stop_ids) or finish == "length":  # no stop string: flush all
            self.detok.finalize()
            more, hit = self.stop_text.feed(self.detok.last_segment)
            text += more + ("" if hit else self.stop_text.flush())
        return self.event(token, text, finish, logprob, top)

    def event(self, token: int | None, text: str, finish: str | None, logprob: float | None = None,
              top: tuple[tuple[int, float], ...] = (), error: str | None = None) -> BatchEvent:
        return BatchEvent(uid=self.uid, token=token, text=text, finish_reason=finish, logprob=logprob,
                          top_logprobs=top, prompt_tokens=len(self.prompt), cached_tokens=self.cached,
                          generation_tokens=len(self.generated), error=error)

    def fail(self, error: str) -> BatchEvent:
        return self.event(None, "", "error", error=error)


def parse_stop(stop: Any) -> tuple[frozenset[int], tuple[str, ...]]:
    """`stop`: None, a str, an int token id, or a list of those -> (extra stop ids, stop strings)."""
    items = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    ids = [s for s in items if isinstance(s, int) and not isinstance(s, bool)]
    texts = [s for s in items if isinstance(s, str)]
    if len(ids) + len(texts) != len(items):
        raise ValueError(f"stop: expected strings or token ids, got {stop!r}")
    return frozenset(ids), tuple(texts)
