"""A bounded HTTP load for OpenAI-compatible servers: a fixed list of streamed completion requests sent
by `concurrency` workers; aggregate generated tokens/s and time to first token per request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks._synthetic import prompt_ids

ROOT = Path(__file__).resolve().parent.parent


def requests_for(vocab: int, n: int, prompt_tokens: int, system_tokens: int, batch: int = 0) -> list[str]:
    """n word-level prompts (`t12 t7 ...`, one token per word) sharing their first `system_tokens` words
    with every batch; the rest differs between prompts and between batches (so no prompt cache holds a
    whole prompt from an earlier batch)."""
    system = prompt_ids(vocab, system_tokens, seed=10**6)
    return [" ".join(f"t{i}" for i in system + prompt_ids(vocab, prompt_tokens - system_tokens, seed=batch * n + k))
            for k in range(n)]


def one_request(url: str, prompt: str, max_tokens: int, timeout: float) -> dict[str, float]:
    """Stream one completion: seconds to the first text, seconds in all, completion tokens. No `model`
    field: mlx-lm's server would try to load a model of that name."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, chunks, tokens = time.perf_counter(), None, 0, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if any(c.get("text") for c in data.get("choices", [])):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "seconds": end - start, "tokens": tokens if tokens is not None else chunks}


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_load(url: str, prompts: list[str], max_tokens: int, concurrency: int, timeout: float) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens, timeout), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(_p([r["ttft"] for r in results], 0.5), 4),
            "ttft_p95_s": round(_p([r["ttft"] for r in results], 0.95), 4)}


class Served:
    """A server process on a loopback port, up once `health` answers; stopped with SIGTERM."""

    def __init__(self, cmd: list[str], port: int, health: str, startup_s: float = 300) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited: {self.proc.communicate()[1][-500:]}")
            try:
                if httpx.get(self.url + health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{' '.join(cmd[:3])} did not start within {startup_s:.0f} s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.communicate()
        return self.proc.returncode


def server_command(kind: str, folder: str, port: int) -> tuple[list[str], str]:
    """(command, health path) of `ours-mlx`, `ours-torch` or `mlx_lm`."""
    if kind == "mlx_lm":
        return [sys.executable, "-m", "mlx_lm", "server", "--model", folder, "--port", str(port), "--temp", "0",
                "--log-level", "WARNING"], "/health"
    backend = kind.split("-")[1]
    return [sys.executable, "-m", "apps.server", "--model", folder, "--backend", backend, "--port", str(port),
            "--max-batch", "16", "--max-queue", "256"], "/health"


def measure_server(kind: str, folder: str, port: int, batches: list[list[str]], max_tokens: int, levels: list[int],
                   timeout: float) -> dict[str, Any]:
    """Warm up on batches[0][:2], then level i sends batches[i + 1]."""
    cmd, health = server_command(kind, folder, port)
    server = Served(cmd, port, health)
    try:
        run_load(server.url, batches[0][:2], 4, 2, timeout)
        return {"server": kind, "levels": [run_load(server.url, batches[i + 1], max_tokens, c, timeout)
                                           for i, c in enumerate(levels)]}
    finally:
        server.stop()
