"""The engine: one thread owns the model and runs a `BatchGenerator` (the main thread: MLX's streams
belong to the thread that made them); the asyncio side, in another thread, talks to it through a
command queue, and gets each request's events back on an asyncio queue of its own.

A job's queue receives, in order: its uid (accepted) or a `RequestError` (refused), then its
`BatchEvent`s up to one with a finish reason. Cancelling a job removes its row at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apps.server_metrics import Metrics
from apps.server_prompt import Job, RequestError
from common.datatypes import BatchEvent


class QueueFull(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the server's queue is full ({limit} waiting requests); retry later", None,
                         "rate_limit_exceeded", 429)


class ShuttingDown(RequestError):
    def __init__(self) -> None:
        super().__init__("the server is shutting down", None, "server_shutting_down", 503)


@dataclass(eq=False)
class Ticket:
    """The asyncio side's handle on one job; the jobs of one request share their `events` queue, whose
    items are (index, uid | RequestError | BatchEvent)."""

    job: Job
    index: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    uid: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when its previous token arrived
    started: bool = False  # has had its first token (no longer counts as queued)
    done: bool = False

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, item))


class Engine:
    """With a tensor-parallel `world`, rank 0 runs this engine for the HTTP side and, each turn, sends
    the other ranks a log of what it did to the generator (inserts with their seeds, removals); they
    replay it (`follow`) and step with it, so every rank runs the same batch."""

    def __init__(self, make_generator: Any, max_queue: int, metrics: Metrics, world: Any = None) -> None:
        self._make_generator = make_generator
        self.gen = make_generator()
        self.max_queue, self.metrics, self.world = max_queue, metrics, world
        self._log: list[tuple[str, Any]] = []  # this turn's generator changes, for the other ranks
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted jobs without a first token yet
        self._draining = False
        self._active: dict[int, Ticket] = {}

    def submit(self, jobs: list[Job]) -> list[Ticket]:
        """Queue `jobs` (all or none); raises QueueFull or ShuttingDown. Call from the event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._draining:
                raise ShuttingDown()
            if self._queued + len(jobs) > self.max_queue:
                raise QueueFull(self.max_queue)
            self._queued += len(jobs)
        events: asyncio.Queue = asyncio.Queue()
        tickets = [Ticket(job, i, loop, events) for i, job in enumerate(jobs)]
        self._commands.put(("insert", tickets))  # one command: all are queued before the next step
        return tickets

    def cancel(self, ticket: Ticket) -> None:
        if not ticket.done:
            self._commands.put(("cancel", ticket))

    def drain(self) -> None:
        """Stop taking requests and end every open one now (running rows finish with "length")."""
        with self._lock:
            self._draining = True
        self._commands.put(("drain", None))

    def run(self, until: Callable[[], bool]) -> None:
        """Serve in this thread until `until()` is true (checked at least every 0.1 s)."""
        while not until():
            self._take_commands(block=self.gen.idle)
            if self.world is not None:
                self.world.broadcast(self._log)
            self._log = []
            self.metrics.observe_generator(self.gen)
            if not self.gen.idle:
                for e in self._step():
                    self._deliver(e)
                self.metrics.observe_generator(self.gen)
        if self.world is not None:
            self.world.broadcast(None)  # the other ranks stop following

    def follow(self) -> None:
        """A rank other than 0: replay rank 0's log and step with it, until rank 0 stops."""
        while (log := self.world.broadcast(None)) is not None:
            for kind, value in log:
                if kind == "insert":
                    self.gen.insert(value.prompt, value.max_tokens, value.sampling, images=value.images,
                                    stop=value.stop, logprobs=value.logprobs)
                else:
                    self.gen.remove(value)
            if not self.gen.idle:
                self._step()

    def _step(self) -> list[BatchEvent]:
        try:
            return self.gen.step()
        except Exception as e:  # noqa: BLE001 - a failed step ends its rows; the server goes on
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            return []

    def _take_commands(self, block: bool) -> None:
        """Apply queued commands (waiting up to 0.1 s for one when idle)."""
        try:
            kind, ticket = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "insert":
                for t in ticket:
                    self._insert(t)
            elif kind == "cancel" and ticket.uid in self._active:
                self._remove(ticket.uid)
                self._finish(ticket)
                self.metrics.cancelled.inc()
            elif kind == "drain":
                self._end_all()
            try:
                kind, ticket = self._commands.get_nowait()
            except queue.Empty:
                return

    def _insert(self, t: Ticket) -> None:
        if self._draining:
            self._finish(t, ShuttingDown())
            return
        j = t.job
        if self.world is not None and j.sampling.seed is None and not j.sampling.greedy:
            # every rank must draw the same numbers: the seed travels with the job
            j = dataclasses.replace(j, sampling=dataclasses.replace(j.sampling, seed=int(np.random.default_rng(
                ).integers(2**63 - 1))))
        try:
            t.uid = self.gen.insert(j.prompt, j.max_tokens, j.sampling, images=j.images, stop=j.stop,
                                    logprobs=j.logprobs)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            self._finish(t, RequestError(str(e), "prompt", code))
            return
        self._log.append(("insert", j))
        self._active[t.uid] = t
        t.put(t.uid)

    def _remove(self, uid: int) -> None:
        self.gen.remove(uid)
        self._log.append(("remove", uid))

    def _deliver(self, e: BatchEvent) -> None:
        t = self._active.get(e.uid)
        if t is None:
            return
        now = time.perf_counter()
        if e.token is not None:
            if t.last is None:
                self.metrics.ttft.observe(now - t.submitted)
            else:
                self.metrics.per_token.observe(now - t.last)
            t.last = now
            self._started(t)
        t.put(e)
        if e.finish_reason is not None:
            self._finish(t)
            self.metrics.tokens(e.prompt_tokens, e.generation_tokens)

    def _started(self, t: Ticket) -> None:
        if not t.started:
            t.started = True
            with self._lock:
                self._queued -= 1

    def _finish(self, t: Ticket, error: RequestError | None = None) -> None:
        self._started(t)
        t.done = True
        self._active.pop(t.uid, None)
        if error is not None:
            t.put(error)

    def _end_all(self) -> None:
        for t in list(self._active.values()):
            self._remove(t.uid)
            t.put(BatchEvent(uid=t.uid, token=None, text="", finish_reason="length"))
            self._finish(t)

    def _fail_all(self, message: str) -> None:
        """A step failed (on every rank alike): end its rows and start a fresh generator."""
        for t in list(self._active.values()):
            t.put(BatchEvent(uid=t.uid, token=None, text="", finish_reason="error", error=message))
            self._finish(t)
        self.gen = self._make_generator()
