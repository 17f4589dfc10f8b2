"""One batching benchmark variant in its own process: ours through `BatchGenerator` at several batch
sizes, or mlx-lm on the same requests (its `batch_generate`, and one request after another).

Metrics for a set of B requests submitted together, greedy, `gen_tokens` each:
- ttft: seconds from submission to each request's first token (p50 and p95 over the set);
- decode_tps: tokens generated per second once every request has its first token (all rows decoding);
- e2e_tps: all generated tokens over the whole set's wall time, prefill included.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks._runners import TORCH_DTYPES, _peak_gb
from benchmarks._synthetic import prompt_ids


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _summary(ttfts: list[float], total: int, wall: float, decode_tokens: int, decode_s: float) -> dict[str, float]:
    return {"ttft_p50_s": round(_p(ttfts, 0.5), 4), "ttft_p95_s": round(_p(ttfts, 0.95), 4),
            "decode_tps": round(decode_tokens / decode_s, 2) if decode_s > 0 else 0.0,
            "e2e_tps": round(total / wall, 2), "tokens": total}


def measure_ours(gen_cls: Any, model: Any, tok: Any, prompts: list[list[int]], n: int) -> dict[str, float]:
    gen = gen_cls(model, tok, max_batch=max(len(prompts), 1))
    t0 = time.perf_counter()
    for p in prompts:
        gen.insert(p, max_tokens=n)
    ttfts: list[float] = []
    total = decode_tokens = 0
    all_started = None
    while not gen.idle:
        events = gen.step()
        now = time.perf_counter()
        got = sum(e.token is not None for e in events)
        total += got
        if all_started is not None:
            decode_tokens += got
        ttfts += [now - t0 for e in events if e.generation_tokens == 1 and e.token is not None]
        if all_started is None and len(ttfts) == len(prompts):
            all_started = now
    end = time.perf_counter()
    return _summary(ttfts, total, end - t0, decode_tokens, end - (all_started or end))


def _load_ours(backend: str, path: str, dtype: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    float_dtype = dtype if dtype in TORCH_DTYPES else None  # q4 / q8: the folder says
    if backend == "mlx":
        from mlx_llm import BatchGenerator, load

        model, tok = load(path, dtype=float_dtype)
    else:
        from torch_backend import BatchGenerator, load

        model, tok = load(path, dtype=float_dtype, device=device)
    return BatchGenerator, model, tok


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Every batch size in `spec["batches"]`, `trials` times each (medians), after a warm-up."""
    gen_cls, model, tok = _load_ours(spec["backend"], spec["path"], spec["dtype"], spec.get("device", "cpu"))
    prompts = [prompt_ids(int(spec["vocab_size"]), int(spec["prompt_tokens"]), seed=i)
               for i in range(max(spec["batches"]))]
    measure_ours(gen_cls, model, tok, prompts[:2], 4)
    out = {}
    for b in spec["batches"]:
        trials = [measure_ours(gen_cls, model, tok, prompts[:b], int(spec["gen_tokens"]))
                  for _ in range(int(spec["trials"]))]
        out[str(b)] = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
    return {"batches": out, **_peak_gb(spec["backend"])}


def run_mlx_lm(spec: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm on the `peer_batch` requests: `batch_generate` if it runs Llama 4, then one by one."""
    import mlx_lm

    model, tok = mlx_lm.load(spec["path"])
    prompts = [prompt_ids(int(spec["vocab_size"]), int(spec["prompt_tokens"]), seed=i)
               for i in range(int(spec["peer_batch"]))]
    n = int(spec["gen_tokens"])
    result: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        mlx_lm.batch_generate(model, tok, prompts, max_tokens=n)
        result["batch_generate_s"] = round(time.perf_counter() - t, 3)
    except Exception as e:  # recorded: what mlx-lm does with Llama 4 is part of the result
        result["batch_generate_error"] = f"{type(e).__name__}: {e}"[:300]
    list(mlx_lm.stream_generate(model, tok, prompts[0], max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    ttfts, total, decode_tokens, decode_s = [], 0, 0, 0.0
    for p in prompts:
        stamps = [time.perf_counter() for _ in mlx_lm.stream_generate(model, tok, p, max_tokens=n)]
        ttfts.append(stamps[0] - t0)
        total += len(stamps)
        decode_tokens += len(stamps) - 1
        decode_s += stamps[-1] - stamps[0]
    result["sequential"] = _summary(ttfts, total, time.perf_counter() - t0, decode_tokens, decode_s)
    return result | _peak_gb("mlx")
