"""Generation speed of both backends against mlx-lm, transformers and llama.cpp on the same weights;
prints JSON (stdout) and a markdown table (stderr).

    python -m benchmarks.bench_generate [--size tiny|small|medium | --model PATH] [--backends mlx,torch]
        [--dtypes float32,bfloat16,q8,q4] [--trials 3] [--rounds 1] [--prompt-tokens 512] [--gen-tokens 128]
        [--threads N] [--no-peers] [--compile] [--extras kv,moe,membw] [--json FILE]

For each backend and dtype: load time, prefill tokens/s (time to the first token of a
`--prompt-tokens` prompt), decode tokens/s (the next `--gen-tokens` - 1 greedy tokens), peak
memory; each in a fresh process (so peak memory is its own; `--compile`'s `ours_compiled` compiles
its decode step while loading), one warm-up (`warmup_s`), then `--trials` runs;
with `--rounds` the whole sequence repeats and medians are over every trial of every round.
Right after each of ours, the same weights through its peers when installed: mlx-lm
(`mlx_lm.load` + `stream_generate`; q8/q4 folders come from `apps.convert`, which mlx-lm reads)
for MLX; for torch, transformers (`Llama4ForCausalLM.from_pretrained` + greedy `generate` with its
cache; float only) and llama.cpp (`llama-cpp-python` on GGUF F32 / BF16 / Q8_0 / Q4_0 files made by
llama.cpp's converter, see benchmarks/_llama_cpp.py; needs $LLAMA_CPP_DIR). A peer that fails
(mlx-lm's bfloat16 Llama 4 on a Linux CPU) is recorded, not fatal.

Extras: `membw` (this machine's bandwidth, see benchmarks/membw.py, measured at the start and
again right before each run) gives each run's fraction of the decode roofline; `kv` compares the
caches' memory at a context of 16 chunks with a cache that keeps every position in every layer;
`moe` decodes models of equal active size with 8 and 64 experts. Without `--model`, a synthetic
float32 model of `--size` is written to a temporary folder. `--device cuda` runs ours and
transformers on the GPU, and adds transformers' speed recipe as a second peer (`transformers_static`:
a static cache and `torch.compile(mode="reduce-overhead")`); a peer that fails there is recorded.
MLX runs read `apps.convert` output (float32, or q8/q4), the layout mlx-lm writes; torch runs read
the Hugging Face folder in float and the same `apps.convert` q8/q4 folders (kept packed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._roofline import decode_bytes
from benchmarks._synthetic import SIZES, parameter_count, synthetic_args, write_model
from common.args import ModelArgs, QuantizationArgs
from common.files import find_checkpoint, read_args

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"torch": ("float32", "bfloat16", "q8", "q4"), "mlx": ("float32", "bfloat16", "q8", "q4")}
PEERS = {"torch": ("transformers", "llama_cpp"), "mlx": ("mlx_lm",)}
OURS = ("ours", "ours_compiled")  # ours_compiled: torch's CPU decode step through torch.compile (--compile)
FLOAT_ONLY = ("transformers", "transformers_static")  # peers that cannot read the q8/q4 folders
CUDA_PEERS = ("transformers", "transformers_static")  # on CUDA also transformers' static cache + torch.compile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=list(SIZES), default="small", help="synthetic model size")
    src.add_argument("--model", default=None, help="an unquantized model folder instead of a synthetic one")
    p.add_argument("--backends", default="torch,mlx")
    p.add_argument("--dtypes", default="float32,bfloat16,q8,q4", help="q8/q4: apps.convert folders")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat every run this often; medians over all trials")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads in every process (0: torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of the torch runs")
    p.add_argument("--no-peers", action="store_true", help="skip mlx-lm, transformers and llama.cpp")
    p.add_argument("--compile", action="store_true",
                   help="torch on the CPU: also run ours with the compiled decode step (ours_compiled)")
    p.add_argument("--extras", default="kv,moe,membw", help="any of kv, moe, membw; empty for none")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_child(task: dict[str, Any], timeout: float, module: str = "benchmarks.bench_generate") -> dict[str, Any]:
    """Run one task in a fresh interpreter (`python -m module --child TASK`); its JSON result, or
    {"error": ...} if it failed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", module, "--child", json.dumps(task)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1][-400:] if lines else f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(task: dict[str, Any]) -> dict[str, Any]:
    if task.get("kind") == "kv":
        from benchmarks._extras import kv_memory

        return kv_memory(task["backend"])
    from benchmarks._runners import run_variant

    return run_variant(task)


def folders_for(src: Path, work: Path, runs: list[tuple[str, str, str]]) -> dict[tuple[str, str], Path | str]:
    """(backend or llama_cpp, dtype) -> folder or file: torch reads the source in float and `apps.convert`
    output in q8/q4; MLX reads `apps.convert` output (float32, or q8/q4), the layout mlx-lm writes and
    reads best (row-major [E, out, in] experts); llama.cpp a GGUF file of the dtype (or the error
    that kept it from being made)."""
    from apps.convert import convert

    out: dict[tuple[str, str], Path | str] = {}
    for impl, backend, dtype in runs:
        if impl == "llama_cpp":
            from benchmarks._llama_cpp import to_gguf

            try:
                out[impl, dtype] = to_gguf(src, work / "gguf", dtype)
            except (RuntimeError, OSError) as e:
                out[impl, dtype] = str(e)
        elif backend == "torch" and not dtype.startswith("q"):
            out[backend, dtype] = src
        elif (backend, dtype) not in out:
            quant = QuantizationArgs(group_size=64, bits=int(dtype[1:])) if dtype.startswith("q") else None
            name = dtype if quant else "mlx-float32"
            folder = work / name
            out[backend, dtype] = folder if folder.exists() else convert(src, folder, quant, dtype="float32")
    return out


def _peer_available(peer: str) -> bool:
    if peer == "llama_cpp":
        from benchmarks._llama_cpp import available

        return available()
    return _installed(peer.split("_static")[0])


def peers_of(backend: str, device: str = "cpu") -> tuple[str, ...]:
    return CUDA_PEERS if backend == "torch" and device == "cuda" else PEERS[backend]


def plan(backends: list[str], dtypes: list[str], peers: bool, device: str = "cpu",
         compiled: bool = False) -> list[tuple[str, str, str]]:
    """(impl, backend, dtype) in run order: each of ours (and, with `compiled`, torch's compiled CPU
    decode step), then its peers on the same folder."""
    out = []
    for backend in backends:
        for dtype in (d for d in DTYPES[backend] if d in dtypes):
            out.append(("ours", backend, dtype))
            if compiled and backend == "torch" and device == "cpu":
                out.append(("ours_compiled", backend, dtype))
            out += [(p, backend, dtype) for p in peers_of(backend, device)
                    if peers and _peer_available(p) and not (dtype.startswith("q") and p in FLOAT_ONLY)]
    return out


def _with_roofline(result: dict[str, Any], args: ModelArgs, dtype: str, impl: str, opts: argparse.Namespace,
                   bandwidth: float | None) -> dict[str, Any]:
    if "decode_tps" not in result or not bandwidth:
        return result
    # transformers multiplies every expert for every token; its roofline counts what it reads.
    nbytes = decode_bytes(args, dtype, opts.prompt_tokens, opts.gen_tokens, all_experts=impl == "transformers")
    roof = bandwidth * 1e9 / nbytes
    return result | {"decode_bytes_per_token": int(nbytes), "roofline_tps": round(roof, 2),
                     "roofline_fraction": round(result["decode_tps"] / roof, 3)}


def ratios(runs: list[dict[str, Any]], device: str = "cpu") -> list[dict[str, Any]]:
    """ours / peer for each (backend, dtype) and each of its peers that ran."""
    out = []
    for ours in (r for r in runs if r["impl"] in OURS):
        for name in peers_of(ours["backend"], device):
            if ours["dtype"].startswith("q") and name in FLOAT_ONLY:
                continue
            peer = next((r for r in runs if r["impl"] == name and r["backend"] == ours["backend"]
                         and r["dtype"] == ours["dtype"]), None)
            row = {"impl": ours["impl"], "backend": ours["backend"], "dtype": ours["dtype"], "peer": name}
            if peer is None or "error" in peer or "error" in ours:
                out.append(row | {"peer_error": (peer or {}).get("error", "not run")})
                continue
            same = sum(1 for _ in zip(ours["tokens"], peer["tokens"], strict=False) if _[0] == _[1])
            out.append(row | {"prefill_ratio": round(ours["prefill_tps"] / peer["prefill_tps"], 2),
                              "decode_ratio": round(ours["decode_tps"] / peer["decode_tps"], 2),
                              "load_ratio": round(peer["load_s"] / max(ours["load_s"], 1e-9), 2),
                              "greedy_tokens_equal": f"{same}/{len(ours['tokens'])}"})
    return out


def _run_rounds(order: list[tuple[str, str, str]], folders: dict[tuple[str, str], Path], args: ModelArgs,
                opts: argparse.Namespace, near_membw: bool, bandwidth: float | None) -> list[dict[str, Any]]:
    """Every variant in `order`, `opts.rounds` times over (ours and its peer stay neighbours)."""
    from benchmarks._extras import membw_extra

    raw: dict[tuple[str, str, str], list[dict[str, Any]]] = {v: [] for v in order}
    for r in range(opts.rounds):
        for impl, backend, dtype in order:
            path = folders[impl, dtype] if impl == "llama_cpp" else folders[backend, dtype]
            if isinstance(path, str):  # its GGUF file could not be made
                raw[impl, backend, dtype].append({"error": path})
                continue
            task = {"impl": impl, "backend": backend, "dtype": dtype, "path": str(path),
                    "vocab_size": args.vocab_size, **_settings(opts)}
            print(f"round {r + 1}/{opts.rounds}: {impl} {backend} {dtype} ...", file=sys.stderr, flush=True)
            # This machine's bandwidth drifts with its neighbours' load: measure it beside each run.
            near = membw_extra(mb=256, trials=3).get("roofline_gbps") if near_membw else None
            raw[impl, backend, dtype].append(run_child(task, opts.timeout) | ({"membw_gbps": near} if near else {}))
    runs = []
    for (impl, backend, dtype), results in raw.items():
        merged = merge_rounds(results)
        runs.append({"impl": impl, "backend": backend, "dtype": dtype}
                    | _with_roofline(merged, args, dtype, impl, opts, merged.get("membw_gbps") or bandwidth))
    return runs


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one run: medians over all their trials, the highest peak memory."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    merged = dict(ok[0])
    for key in ("prefill_tps", "decode_tps"):
        merged[f"{key}_trials"] = [v for r in ok for v in r[f"{key}_trials"]]
        merged[key] = round(statistics.median(merged[f"{key}_trials"]), 2)
    merged["load_s"] = round(statistics.median(r["load_s"] for r in ok), 3)
    for key in ("peak_rss_gb", "peak_mlx_gb"):
        if key in merged:
            merged[key] = max(r[key] for r in ok)
    if any("membw_gbps" in r for r in ok):
        merged["membw_gbps"] = round(statistics.median(r["membw_gbps"] for r in ok if "membw_gbps" in r), 2)
    return merged | {"rounds": len(ok)}


def run(opts: argparse.Namespace) -> dict[str, Any]:
    from benchmarks._extras import kv_extra, membw_extra, moe_extra

    backends = [b for b in opts.backends.split(",") if b and _installed("mlx" if b == "mlx" else "torch")]
    dtypes = [d for d in opts.dtypes.split(",") if d]
    extras = {e for e in opts.extras.split(",") if e}
    if opts.device == "cuda":
        extras -= {"membw", "moe"}  # both measure the CPU
    work = Path(tempfile.mkdtemp(prefix="bench_generate-"))
    try:
        src = Path(opts.model) if opts.model else write_model(work / "float32", synthetic_args(opts.size))
        args = read_args(find_checkpoint(src))
        result: dict[str, Any] = {"model": opts.model or f"synthetic {opts.size}",
                                  "parameters": parameter_count(args), "settings": _settings(opts)}
        if "membw" in extras:
            result["membw"] = membw_extra()
        bandwidth = result.get("membw", {}).get("roofline_gbps")
        order = plan(backends, dtypes, not opts.no_peers, opts.device, opts.compile)
        runs = _run_rounds(order, folders_for(src, work, order), args, opts, "membw" in extras, bandwidth)
        result["runs"], result["ratios"] = runs, ratios(runs, opts.device)
        if "kv" in extras:
            result["kv_memory"] = kv_extra(backends, opts.timeout)
        if "moe" in extras:
            result["moe_scaling"] = moe_extra(opts, backends, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _settings(opts: argparse.Namespace) -> dict[str, Any]:
    return {"prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "trials": opts.trials,
            "rounds": opts.rounds, "threads": opts.threads, "device": opts.device}


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.child:
        print(json.dumps(child_main(json.loads(opts.child))))
        return 0
    from benchmarks._report import emit, markdown

    result = run(opts)
    emit(result, opts.json, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
