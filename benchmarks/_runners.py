"""One benchmark variant in its own process: load a folder with one library, then time greedy
generation through that library's public generation API.

Each runner returns a function `timed(prompt_ids, max_tokens) -> (tokens, stamps)`: the greedy
tokens and the `time.perf_counter()` at which each arrived, relative to the call. The first stamp
ends the prefill; the rest time decoding. Variants are dicts (JSON from the parent):
`impl` (ours | ours_compiled | mlx_lm | transformers | transformers_static | llama_cpp), `backend`
(mlx | torch), `dtype`, `path`, `prompt_tokens`, `gen_tokens`, `trials`, `threads`.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks._synthetic import prompt_ids

Timed = Callable[[list[int], int], tuple[list[int], list[float]]]
TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _stamped(tokens: Iterator[int]) -> tuple[list[int], list[float]]:
    start = time.perf_counter()
    out, stamps = [], []
    for t in tokens:
        out.append(int(t))
        stamps.append(time.perf_counter() - start)
    return out, stamps


def _ours(backend: str, path: str, dtype: str | None, device: str = "cpu", compiled: bool = False) -> Timed:
    from common.sampling import SamplingParams

    if backend == "mlx":
        from mlx_llm import load, stream_generate

        model, tok = load(path, dtype=dtype)
    else:
        from torch_backend import load, stream_generate

        model, tok = load(path, dtype=dtype, device=device, compile_decode=compiled)
    greedy = SamplingParams(temperature=0.0)
    return lambda ids, n: _stamped(r.token for r in stream_generate(model, tok, ids, max_tokens=n, sampling=greedy))


def _mlx_lm(path: str, dtype: str | None) -> Timed:
    import mlx.core as mx
    import mlx_lm

    model, tok = mlx_lm.load(path)
    if dtype is not None:  # the folder is float32; mlx-lm has no load-time dtype
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
    return lambda ids, n: _stamped(r.token for r in mlx_lm.stream_generate(model, tok, ids, max_tokens=n))


class _Streamer:
    """transformers' streamer protocol: `put` gets the prompt once, then each new token."""

    def __init__(self) -> None:
        self.start, self.stamps, self.calls = time.perf_counter(), [], 0

    def put(self, value: Any) -> None:
        if self.calls:
            self.stamps.append(time.perf_counter() - self.start)
        self.calls += 1

    def end(self) -> None:
        pass


def _transformers(path: str, dtype: str | None, device: str = "cpu", static: bool = False) -> Timed:
    """transformers' generate with its dynamic cache, or (`static`) its speed recipe: a static cache
    and the forward compiled with `torch.compile(mode="reduce-overhead")`."""
    import torch
    import transformers
    from transformers import Llama4ForCausalLM

    transformers.logging.set_verbosity_error()
    model = Llama4ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype or "float32")).to(device).eval()
    model.generation_config.eos_token_id = []  # never stop early: exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    extra: dict[str, Any] = {}
    if static:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        extra["cache_implementation"] = "static"

    def timed(ids: list[int], n: int) -> tuple[list[int], list[float]]:
        x = torch.tensor([ids], device=device)
        streamer = _Streamer()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                 streamer=streamer, **extra)
        return out[0, len(ids):].tolist(), streamer.stamps

    return timed


def load_runner(spec: dict[str, Any]) -> Timed:
    impl, backend, dtype, path = spec["impl"], spec["backend"], spec.get("dtype"), spec["path"]
    device = spec.get("device", "cpu")
    float_dtype = dtype if dtype in TORCH_DTYPES else None  # q4 / q8: the folder says
    if impl in ("ours", "ours_compiled"):
        return _ours(backend, path, float_dtype, device, compiled=impl == "ours_compiled")
    if impl == "mlx_lm":
        return _mlx_lm(path, None if float_dtype == "float32" else float_dtype)
    if impl == "llama_cpp":
        from benchmarks._llama_cpp import runner

        return runner(path, int(spec.get("threads") or 0), int(spec["prompt_tokens"]) + int(spec["gen_tokens"]) + 64)
    if impl in ("transformers", "transformers_static"):
        return _transformers(path, float_dtype, device, static=impl == "transformers_static")
    raise ValueError("impl: expected ours, ours_compiled, mlx_lm, llama_cpp, transformers or transformers_static, "
                     f"got {impl!r}")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc (VmHWM): `ru_maxrss` keeps the high-water
    mark of the forked parent across exec, so a small child would report its parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _peak_gb(backend: str, device: str = "cpu") -> dict[str, float]:
    rss = _peak_rss_bytes()
    out = {"peak_rss_gb": round(rss / 1e9, 3)}
    if backend == "mlx":
        import mlx.core as mx

        out["peak_mlx_gb"] = round(mx.get_peak_memory() / 1e9, 3)
    if device == "cuda":
        import torch

        out["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up (one prefill and a few tokens), then `trials` timed runs; medians and all trials."""
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    t = time.perf_counter()
    timed = load_runner(spec)
    load_s = time.perf_counter() - t
    prompt = prompt_ids(int(spec["vocab_size"]), int(spec["prompt_tokens"]))
    n = int(spec["gen_tokens"])
    t = time.perf_counter()
    timed(prompt, min(4, n))
    warmup_s = time.perf_counter() - t
    prefill, decode, tokens = [], [], []
    for _ in range(int(spec["trials"])):
        tokens, stamps = timed(prompt, n)
        if len(stamps) != n:
            raise RuntimeError(f"{spec['impl']}: asked for {n} tokens, got {len(stamps)}")
        prefill.append(len(prompt) / stamps[0])
        decode.append((n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0)
    return {"load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
            "prefill_tps": round(statistics.median(prefill), 2), "decode_tps": round(statistics.median(decode), 2),
            "prefill_tps_trials": [round(v, 2) for v in prefill], "decode_tps_trials": [round(v, 2) for v in decode],
            "tokens": tokens[:16], **_peak_gb(spec["backend"], spec.get("device", "cpu"))}
