"""Batched generation: aggregate decode tokens/s and time to first token at several batch sizes, on
both backends, and mlx-lm on the same requests; prints JSON (stdout) and markdown (stderr).

    python -m benchmarks.bench_batch [--size small | --model PATH] [--runs torch:float32,mlx:q4,...]
        [--batches 1,2,4,8,16] [--prompt-tokens 128] [--gen-tokens 64] [--trials 1] [--peer-batch 8]
        [--no-peers] [--json FILE]

B requests of `--prompt-tokens` distinct pseudo-random ids go to a `BatchGenerator` together,
greedy, `--gen-tokens` each (see benchmarks/_batch_runs.py for the metrics). Each variant runs in
its own process. mlx-lm (when installed) gets the first `--peer-batch` requests on the same MLX
folder: its `batch_generate` (recorded as an error where it cannot batch Llama 4), then
`stream_generate` one request after another, as its server serves Llama 4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._report import _table, emit
from benchmarks._synthetic import SIZES, parameter_count, synthetic_args, write_model
from benchmarks.bench_generate import _installed, folders_for, run_child
from common.files import find_checkpoint, read_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=list(SIZES), default="small", help="synthetic model size")
    src.add_argument("--model", default=None, help="an unquantized model folder instead of a synthetic one")
    p.add_argument("--runs", default="torch:float32,torch:bfloat16,mlx:float32,mlx:q4",
                   help="backend:dtype pairs (mlx dtypes: float32, bfloat16, q8, q4)")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--peer-batch", type=int, default=8)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the torch runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def child_main(task: dict[str, Any]) -> dict[str, Any]:
    from benchmarks._batch_runs import run_mlx_lm, run_ours

    return run_mlx_lm(task) if task["impl"] == "mlx_lm" else run_ours(task)


def ratios(runs: list[dict[str, Any]], peer_batch: int) -> list[dict[str, Any]]:
    """Per run: decode tokens/s at each batch over batch 1; MLX runs: ours at `peer_batch` over mlx-lm."""
    out = []
    for r in (x for x in runs if x["impl"] == "ours" and "batches" in x):
        one = r["batches"].get("1", {}).get("decode_tps")
        row: dict[str, Any] = {"backend": r["backend"], "dtype": r["dtype"]}
        if one:
            row["decode_vs_batch1"] = {b: round(m["decode_tps"] / one, 2) for b, m in r["batches"].items()}
        peer = next((x for x in runs if x["impl"] == "mlx_lm" and x["dtype"] == r["dtype"]), None)
        mine = r["batches"].get(str(peer_batch))
        if r["backend"] == "mlx" and peer and "sequential" in peer and mine:
            seq = peer["sequential"]
            row |= {"vs_mlx_lm_e2e": round(mine["e2e_tps"] / seq["e2e_tps"], 2),
                    "vs_mlx_lm_decode": round(mine["decode_tps"] / seq["decode_tps"], 2),
                    "ttft_p95_ours_s": mine["ttft_p95_s"], "ttft_p95_mlx_lm_s": seq["ttft_p95_s"]}
        out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        if "error" in r:
            rows.append([r["impl"], r["backend"], r["dtype"], "-", "failed: " + r["error"][:80], None, None, None])
        for b, m in r.get("batches", {}).items():
            rows.append([r["impl"], r["backend"], r["dtype"], b, m["decode_tps"], m["e2e_tps"], m["ttft_p50_s"],
                         m["ttft_p95_s"]])
        if "sequential" in r:
            m = r["sequential"]
            note = f"{result['settings']['peer_batch']} one by one"
            rows.append([r["impl"], r["backend"], r["dtype"], note, m["decode_tps"], m["e2e_tps"], m["ttft_p50_s"],
                         m["ttft_p95_s"]])
    parts = [_table(["impl", "backend", "dtype", "batch", "decode tok/s", "end-to-end tok/s", "TTFT p50 s",
                     "TTFT p95 s"], rows)]
    for r in result["ratios"]:
        parts.append(f"{r['backend']} {r['dtype']}: " + json.dumps({k: v for k, v in r.items()
                                                                     if k not in ("backend", "dtype")}))
    for r in result["runs"]:
        if "batch_generate_error" in r:
            parts.append(f"mlx-lm batch_generate on this model: {r['batch_generate_error']}")
    return "\n\n".join(parts)


def run(opts: argparse.Namespace) -> dict[str, Any]:
    pairs = [tuple(x.split(":")) for x in opts.runs.split(",") if x]
    pairs = [(b, d) for b, d in pairs if _installed("mlx" if b == "mlx" else "torch")]
    settings = {"prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "trials": opts.trials,
                "batches": [int(b) for b in opts.batches.split(",")], "peer_batch": opts.peer_batch,
                "device": opts.device}
    work = Path(tempfile.mkdtemp(prefix="bench_batch-"))
    try:
        src = Path(opts.model) if opts.model else write_model(work / "float32", synthetic_args(opts.size))
        args = read_args(find_checkpoint(src))
        order = [("ours", b, d) for b, d in pairs]
        if not opts.no_peers and _installed("mlx_lm"):
            order += [("mlx_lm", b, d) for b, d in pairs if b == "mlx"]
        folders = folders_for(src, work, order)
        runs = []
        for impl, backend, dtype in order:
            print(f"{impl} {backend} {dtype} ...", file=sys.stderr, flush=True)
            task = {"impl": impl, "backend": backend, "dtype": dtype, "path": str(folders[backend, dtype]),
                    "vocab_size": args.vocab_size, **settings}
            runs.append({"impl": impl, "backend": backend, "dtype": dtype}
                        | run_child(task, opts.timeout, "benchmarks.bench_batch"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": opts.model or f"synthetic {opts.size}", "parameters": parameter_count(args),
            "settings": settings, "runs": runs, "ratios": ratios(runs, opts.peer_batch)}


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.child:
        print(json.dumps(child_main(json.loads(opts.child))))
        return 0
    result = run(opts)
    emit(result, opts.json, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
