"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llama4_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llama4_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("llama4_generation_tokens", "generated tokens", registry=r)
        self.cancelled = Counter("llama4_cancelled_generations", "generations removed because their client left",
                                 registry=r)
        self.queue_depth = Gauge("llama4_queue_depth", "requests waiting for a row", registry=r)
        self.prefilling = Gauge("llama4_prefilling_rows", "rows whose prompt is being prefilled", registry=r)
        self.running = Gauge("llama4_running_rows", "rows decoding", registry=r)
        self.ttft = Histogram("llama4_time_to_first_token_seconds", "from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("llama4_time_per_output_token_seconds", "between consecutive tokens of a row",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("llama4_prompt_cache_hits", "requests that reused a cached prefix", registry=r)
        self.cached_tokens = Counter("llama4_prompt_cache_tokens", "prompt tokens taken from the prompt cache",
                                     registry=r)
        self._seen = (0, 0)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)

    def observe_generator(self, gen: Any) -> None:
        """Gauges and prompt-cache counters from the generator's state (engine thread)."""
        counts = gen.counts
        self.queue_depth.set(counts["waiting"])
        self.prefilling.set(counts["prefilling"])
        self.running.set(counts["running"])
        cache = gen.prompt_cache
        if cache is not None:
            hits, tokens = cache.hits, cache.cached_tokens
            self.cache_hits.inc(max(hits - self._seen[0], 0))
            self.cached_tokens.inc(max(tokens - self._seen[1], 0))
            self._seen = (hits, tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
