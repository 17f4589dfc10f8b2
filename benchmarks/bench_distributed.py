"""Tensor parallelism: generation speed and peak memory per rank at 1 and 2 ranks; prints JSON
(stdout) and markdown (stderr).

    python -m benchmarks.bench_distributed [--size medium | --model PATH] [--backends torch,mlx]
        [--prompt-tokens 128] [--gen-tokens 32] [--json FILE]

Each backend runs benchmarks/_dist_child.py once as a single process and once under its launcher
with 2 ranks (torchrun with gloo; mlx.launch with the ring backend) on the same float32 folder (the
synthetic model, or --model). Greedy decoding after a prompt; the best of two timed runs after a
warm-up; peak resident memory per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._report import _table, emit
from benchmarks._synthetic import SIZES, synthetic_args, write_model
from benchmarks.bench_generate import _installed

ROOT = Path(__file__).resolve().parent.parent
CHILD = str(Path(__file__).parent / "_dist_child.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=list(SIZES), default="medium", help="synthetic model size")
    src.add_argument("--model", default=None, help="a float model folder instead of a synthetic one")
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    return p


def _command(backend: str, ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable]
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return [shutil.which("mlx.launch") or "mlx.launch", "-n", str(ranks), "--backend", "ring", "--", sys.executable]


def _head_and_tail(text: str, n: int = 3000) -> str:
    """A failed launch's stderr: its start (the ranks' own messages) and end (the launcher's summary)."""
    return text if len(text) <= 2 * n else f"{text[:n]}\n...\n{text[-n:]}"


def run_one(backend: str, ranks: int, folder: Path, work: Path, opts: argparse.Namespace) -> dict[str, Any]:
    out = work / f"{backend}-{ranks}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [*_command(backend, ranks), CHILD, backend, str(folder), str(out), str(opts.prompt_tokens),
           str(opts.gen_tokens)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not set(ln.strip()) <= set("=*")]
        errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
        return {"backend": backend, "ranks": ranks, "error": (errors[0] if errors else str(proc.returncode))[-300:],
                "stderr": _head_and_tail(proc.stderr)}
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"backend": backend, "ranks": ranks, "per_rank": per_rank,
            "same_tokens": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank)}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        if "error" in r:
            rows.append([r["backend"], r["ranks"], "failed: " + r["error"][:80], None, None, None])
            continue
        first = r["per_rank"][0]
        rows.append([r["backend"], r["ranks"], first["prefill_tps"], first["decode_tps"],
                     max(x["peak_rss_gb"] for x in r["per_rank"]), first["load_s"]])
    return _table(["backend", "ranks", "prefill tok/s", "decode tok/s", "peak RSS per rank GB", "load s"], rows)


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    backends = [b for b in opts.backends.split(",") if b and _installed("mlx" if b == "mlx" else "torch")]
    work = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    try:
        folder = Path(opts.model) if opts.model else write_model(work / "model", synthetic_args(opts.size))
        runs = []
        for backend in backends:
            for ranks in (1, 2):
                print(f"{backend}, {ranks} rank(s) ...", file=sys.stderr, flush=True)
                runs.append(run_one(backend, ranks, folder, work, opts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": opts.model or f"synthetic {opts.size}", "prompt_tokens": opts.prompt_tokens,
              "gen_tokens": opts.gen_tokens, "cpu_count": os.cpu_count(), "runs": runs}
    emit(result, opts.json, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
