"""Continuous batching, backend-neutral: requests join while others decode and leave when done.

Each `step()` runs one decode step for every running row, then one prefill step for newcomers: up
to `prefill_step_size` prompt tokens, taken from the waiting rows in order (several short prompts
share one right-padded forward; a long prompt goes through in several steps), so running rows never
wait for a whole long prompt. A row whose prompt is done samples its first token and joins the
running batch. The backend supplies the array work through a `BatchOps` object.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from common.batch_request import MAX_LOGPROBS, Row, parse_stop
from common.datatypes import BatchEvent
from common.detokenizer import StreamingDetokenizer
from common.generation import check_prompt
from common.image_prompt import PromptImages, prepare_prompt
from common.penalties import PenaltyBatch
from common.prompt_cache import PromptCache
from common.sampling import SamplingBatch, SamplingParams, agreed
from common.stop_text import StopText
from common.vision_checkpoint import no_vision


class BatchOps(Protocol):
    """A backend's array work for `BatchGenerator`; `caches` are a model's per-layer cache lists."""

    def make_cache(self) -> list: ...
    def merge(self, parts: Sequence[list]) -> list: ...
    def join(self, running: Any, rows: Sequence[list]) -> Any: ...
    def select(self, caches: list, rows: Sequence[int]) -> list: ...
    def filter(self, caches: Any, rows: Sequence[int]) -> Any: ...
    def image_table(self, images: PromptImages, prompt_len: int) -> Any: ...
    def prefill(self, caches: list, chunks: list[list[int]], starts: np.ndarray,
                images: list[tuple[Any, PromptImages, int] | None]) -> Any: ...
    def decode(self, caches: list, tokens: Any, positions: np.ndarray) -> Any: ...
    def sample(self, logits: Any, rows: SamplingBatch, uniforms: np.ndarray,
               penalties: PenaltyBatch | None = None) -> Any: ...
    def take(self, x: Any, rows: Sequence[int]) -> Any: ...
    def concat(self, parts: Sequence[Any]) -> Any: ...
    def to_list(self, tokens: Any) -> list[int]: ...
    def logprobs(self, logits: Any, tokens: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class BatchGenerator:
    def __init__(self, model: Any, tokenizer: Any, max_batch: int = 16, prefill_step_size: int = 512,
                 prompt_cache: PromptCache | None = None, *, ops: BatchOps) -> None:
        if max_batch < 1 or prefill_step_size < 1:
            raise ValueError(f"BatchGenerator: max_batch and prefill_step_size must be >= 1, "
                             f"got {max_batch} and {prefill_step_size}")
        self.model, self.ops, self.tokenizer, self.prompt_cache = model, ops, tokenizer, prompt_cache
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.max_seq_len, self.vision = model.args.max_seq_len, model.args.vision_args
        self._waiting: deque[Row] = deque()
        self._prefilling: list[Row] = []
        self._running: list[Row] = []
        self._cache: list | None = None  # the running rows' caches, in `_running` order
        self._tokens: Any = None  # each running row's last token (device), the next decode input
        self._sampling: SamplingBatch | None = None
        self._next_uid = 0

    @property
    def counts(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "prefilling": len(self._prefilling), "running": len(self._running)}

    @property
    def cache_nbytes(self) -> int:
        """Bytes of key/value storage held for running and prefilling rows."""
        held = [self._cache or []] + [r.cache or [] for r in self._prefilling]
        return sum(c.nbytes for caches in held for c in caches)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._running)

    def insert(self, prompt_ids: str | Sequence[int], max_tokens: int = 256, sampling: SamplingParams | None = None,
               images: Sequence[Any] | None = None, stop: Any = None, logprobs: int = 0) -> int:
        """Queue a request; returns its uid. Bad input raises ValueError here and queues nothing."""
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        sampling = agreed(self.model, sampling)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: must be an int >= 1, got {max_tokens!r}")
        if not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must be an int in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        ids, prompt_images = prepare_prompt(self.tokenizer, prompt_ids, images, self.vision,
                                            no_vision=no_vision(self.model.args))
        check_prompt(ids, self.max_seq_len)
        stop_ids, stop_texts = parse_stop(stop)
        row = Row(uid=self._next_uid, prompt=ids, images=prompt_images,
                  limit=min(max_tokens, self.max_seq_len - len(ids)), sampling=sampling, logprobs=logprobs,
                  stop_ids=frozenset(self.tokenizer.stop_tokens) | stop_ids,
                  detok=StreamingDetokenizer(self.tokenizer), stop_text=StopText(stop_texts))
        self._next_uid += 1
        self._waiting.append(row)
        return row.uid

    def remove(self, uid: int) -> None:
        """Cancel a request wherever it is; a running row's cache memory is released."""
        self._waiting = deque(r for r in self._waiting if r.uid != uid)
        self._prefilling = [r for r in self._prefilling if r.uid != uid]
        gone = [i for i, r in enumerate(self._running) if r.uid == uid]
        if gone:
            self._drop(gone)

    def step(self) -> list[BatchEvent]:
        """One decode step for every running row, then one prefill step for newcomers."""
        events = self._decode() if self._running else []
        return events + self._prefill()

    def _decode(self) -> list[BatchEvent]:
        rows = self._running
        positions = np.array([r.position for r in rows], dtype=np.int64)
        logits = self.ops.decode(self._cache, self._tokens, positions)  # [B, V]
        if self._sampling is None:
            self._sampling = SamplingBatch.of([r.sampling for r in rows])
        tokens = self.ops.sample(logits, self._sampling, np.array([r.random.next() for r in rows]),
                                 PenaltyBatch.of([r.penalties for r in rows]))
        events = self._accept(rows, logits, tokens)
        self._tokens = tokens
        finished = [i for i, e in enumerate(events) if e.finish_reason is not None]
        if finished:
            self._remember([rows[i] for i in finished], self.ops.select(self._cache, finished))
            self._drop(finished)
        return events

    def _accept(self, rows: list[Row], logits: Any, tokens: Any) -> list[BatchEvent]:
        """Each row's event for its sampled token, with log-probabilities where asked."""
        host = self.ops.to_list(tokens)
        n = max(r.logprobs for r in rows)
        if not n:
            return [r.accept(t) for r, t in zip(rows, host, strict=True)]
        chosen, top_ids, top_vals = self.ops.logprobs(logits, tokens, n)
        out = []
        for i, (r, t) in enumerate(zip(rows, host, strict=True)):
            top = tuple(zip(top_ids[i, : r.logprobs].tolist(), top_vals[i, : r.logprobs].tolist(), strict=True))
            out.append(r.accept(t, float(chosen[i]), top) if r.logprobs else r.accept(t))
        return out

    def _drop(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        self._sampling = None
        self._cache = self.ops.filter(self._cache, keep)  # None, or an empty pool kept for the next rows
        self._tokens = self.ops.take(self._tokens, keep) if keep else None

    def _remember(self, rows: list[Row], caches: list) -> None:
        """Offer finished rows' caches (holding the prompt and all generated tokens but the last) for reuse."""
        if self.prompt_cache is None:
            return
        for i, r in enumerate(rows):
            if r.cacheable == len(r.prompt):
                self.prompt_cache.insert(r.prompt + r.generated[:-1], self.ops.select(caches, [i]))

    def _admit(self) -> list[BatchEvent]:
        """Move waiting rows into prefill while the batch has room; look each up in the prompt cache."""
        failed = []
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            row = self._waiting.popleft()
            caches, row.done = None, 0
            if self.prompt_cache is not None and row.cacheable > 1:
                caches, row.done = self.prompt_cache.fetch(row.prompt[: row.cacheable])
            row.cached = row.done
            row.cache = self.ops.make_cache() if caches is None else caches
            try:
                row.table = None if row.images is None else self.ops.image_table(row.images, len(row.prompt))
            except (ValueError, RuntimeError) as e:
                failed.append(row.fail(f"image encoding failed: {e}"))
                continue
            self._prefilling.append(row)
        return failed

    def _prefill(self) -> list[BatchEvent]:
        events = self._admit()
        if not self._prefilling:
            return events
        chosen, budget = [], self.prefill_step_size
        for r in self._prefilling:
            if budget <= 0:
                break
            n = min(r.remaining, budget)
            chosen.append((r, n))
            budget -= n
        rows = [r for r, _ in chosen]
        caches = rows[0].cache if len(rows) == 1 else self.ops.merge([r.cache for r in rows])
        images = [None if r.table is None else (r.table, r.images, r.done) for r in rows]
        try:
            logits = self.ops.prefill(caches, [r.prompt[r.done : r.done + n] for r, n in chosen],
                                      np.array([r.done for r in rows], dtype=np.int64), images)  # [b, V]
        except (ValueError, RuntimeError) as e:
            self._prefilling = [r for r in self._prefilling if r not in rows]
            return events + [r.fail(f"prefill failed: {e}") for r in rows]
        for i, (r, n) in enumerate(chosen):
            r.done += n
            if len(rows) > 1:
                r.cache = self.ops.select(caches, [i])
        ready = [i for i, r in enumerate(rows) if r.remaining == 0]
        return events + (self._start(rows, ready, logits) if ready else [])

    def _start(self, rows: list[Row], ready: list[int], logits: Any) -> list[BatchEvent]:
        """First tokens of rows whose prompt is done; those that go on join the running batch."""
        starting = [rows[i] for i in ready]
        self._prefilling = [r for r in self._prefilling if r not in starting]
        logits = self.ops.take(logits, ready)
        tokens = self.ops.sample(logits, SamplingBatch.of([r.sampling for r in starting]),
                                 np.array([r.random.next() for r in starting]),
                                 PenaltyBatch.of([r.penalties for r in starting]))
        events = self._accept(starting, logits, tokens)
        going = [i for i, e in enumerate(events) if e.finish_reason is None]
        if going:
            self._cache = self.ops.join(self._cache, [starting[i].cache for i in going])
            new = self.ops.take(tokens, going)
            self._tokens = new if self._tokens is None else self.ops.concat([self._tokens, new])
            self._running += [starting[i] for i in going]
            self._sampling = None
        for r in starting:
            if self.prompt_cache is not None and r.cacheable == len(r.prompt):
                self.prompt_cache.insert(r.prompt, r.cache)  # merged (copied) above, so it is free to keep
            r.cache = r.table = None
        return events

