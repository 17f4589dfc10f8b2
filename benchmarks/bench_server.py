"""Our OpenAI-compatible server against mlx-lm's on the same folder and the same requests: aggregate
generated tokens/s and time to first token at several concurrency levels; prints JSON (stdout) and
markdown (stderr).

    python -m benchmarks.bench_server [--size small | --model PATH] [--servers ours-mlx,ours-torch,mlx_lm]
        [--requests 32] [--prompt-tokens 128] [--system-tokens 64] [--gen-tokens 64] [--concurrency 1,4,8]
        [--json FILE]

Every server gets the same `--requests` streamed completions per concurrency level c (word-level
prompts of `--prompt-tokens` tokens whose first `--system-tokens` are shared by all, the rest new at
each level; greedy, `--gen-tokens` each), sent by c client threads over loopback. The folder is the
synthetic model converted by `apps.convert` (float32), which all three servers read. mlx-lm runs
`python -m mlx_lm server`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._http_load import measure_server, requests_for
from benchmarks._report import _table, emit
from benchmarks._synthetic import SIZES, synthetic_args, write_model
from benchmarks.bench_generate import _installed
from common.files import find_checkpoint, read_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_server", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=list(SIZES), default="small", help="synthetic model size")
    src.add_argument("--model", default=None, help="a model folder all the servers can read")
    p.add_argument("--servers", default="ours-mlx,ours-torch,mlx_lm")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--system-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per request")
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    return p


def _level(runs: list[dict[str, Any]], server: str, c: int) -> dict[str, Any] | None:
    run = next((r for r in runs if r["server"] == server and "levels" in r), None)
    return None if run is None else next((x for x in run["levels"] if x["concurrency"] == c), None)


def ratios(runs: list[dict[str, Any]], levels: list[int]) -> dict[str, Any]:
    top, out = max(levels), {}
    for ours in ("ours-mlx", "ours-torch"):
        mine, one = _level(runs, ours, top), _level(runs, ours, 1)
        if mine and one:
            out[f"{ours}_c{top}_vs_c1"] = round(mine["tokens_per_s"] / one["tokens_per_s"], 2)
    mine, peer = _level(runs, "ours-mlx", top), _level(runs, "mlx_lm", top)
    if mine and peer:
        out[f"ours-mlx_vs_mlx_lm_c{top}"] = round(mine["tokens_per_s"] / peer["tokens_per_s"], 2)
        out[f"ttft_p95_c{top}_ours-mlx_s"], out[f"ttft_p95_c{top}_mlx_lm_s"] = mine["ttft_p95_s"], peer["ttft_p95_s"]
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        if "error" in r:
            rows.append([r["server"], "-", "failed: " + r["error"][:100], None, None])
        for x in r.get("levels", []):
            rows.append([r["server"], x["concurrency"], x["tokens_per_s"], x["ttft_p50_s"], x["ttft_p95_s"]])
    table = _table(["server", "concurrency", "generated tok/s", "TTFT p50 s", "TTFT p95 s"], rows)
    return table + "\n\n" + json.dumps(result["ratios"])


def run(opts: argparse.Namespace) -> dict[str, Any]:
    from apps.convert import convert

    levels = [int(c) for c in opts.concurrency.split(",")]
    kinds = [k for k in opts.servers.split(",") if k and _installed({"ours-mlx": "mlx", "ours-torch": "torch",
                                                                       "mlx_lm": "mlx_lm"}[k])]
    work = Path(tempfile.mkdtemp(prefix="bench_server-"))
    try:
        if opts.model:
            folder = Path(opts.model)
        else:
            folder = convert(write_model(work / "src", synthetic_args(opts.size)), work / "mlx-float32", None,
                             dtype="float32")
        args = read_args(find_checkpoint(folder))
        batches = [requests_for(args.vocab_size, opts.requests, opts.prompt_tokens, opts.system_tokens, b)
                   for b in range(len(levels) + 1)]
        runs = []
        for i, kind in enumerate(kinds):
            print(f"{kind} ...", file=sys.stderr, flush=True)
            try:
                runs.append(measure_server(kind, str(folder), opts.port + i, batches, opts.gen_tokens, levels,
                                           opts.timeout))
            except Exception as e:  # noqa: BLE001 - a server that fails is recorded, the others still run
                runs.append({"server": kind, "error": f"{type(e).__name__}: {e}"[:400]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {k: getattr(opts, k) for k in ("requests", "prompt_tokens", "system_tokens", "gen_tokens")}
    return {"model": opts.model or f"synthetic {opts.size}", "settings": settings | {"concurrency": levels},
            "runs": runs, "ratios": ratios(runs, levels)}


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    result = run(opts)
    emit(result, opts.json, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
