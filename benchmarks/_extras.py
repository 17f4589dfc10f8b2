"""The benchmark's extra measurements: memory bandwidth, chunked-cache memory, MoE cost scaling."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._synthetic import random_canonical, synthetic_args, write_model

KV_CHUNK, KV_CHUNKS = 64, 16
MOE_EXPERTS = (8, 64)


def membw_extra(mb: int = 512, trials: int = 5) -> dict[str, Any]:
    """benchmarks.membw in its own process (so its buffers never count in anyone's peak memory)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.membw", "--mb", str(mb), "--trials", str(trials)],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "membw failed"}
    return json.loads(out.stdout)


def kv_memory(backend: str) -> dict[str, Any]:
    """Cache bytes after a prefill of 16 chunks (8 layers, NoPE every 4th), against a cache that keeps
    every position in every layer, in the same dtype."""
    args = synthetic_args("tiny", n_layers=8, chunk=KV_CHUNK)
    context = KV_CHUNK * KV_CHUNKS
    weights = {k: np.asarray(v) for k, v in random_canonical(args).items()}
    tokens = np.arange(context, dtype=np.int64)[None] % args.vocab_size  # [1, context]
    if backend == "mlx":
        import mlx.core as mx

        from common.datatypes import TransformerInput
        from mlx_llm.model import Transformer

        model = Transformer(args)
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
        cache = model.make_cache(1)
        inputs = TransformerInput(tokens=mx.array(tokens.astype(np.int32)), tokens_position=0)
        mx.eval(model(inputs, cache=cache).logits)
    else:
        import torch

        from common.datatypes import TransformerInput
        from torch_backend.model import Transformer

        model = Transformer(args)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
        cache = model.make_cache(1)
        with torch.inference_mode():
            model(TransformerInput(tokens=torch.from_numpy(tokens), tokens_position=0), cache=cache)
    held = sum(c.nbytes for c in cache)
    full = args.n_layers * 2 * args.n_kv_heads * context * args.head_dim * 4  # float32 K and V, every layer
    return {"backend": backend, "context": context, "chunk": KV_CHUNK, "layers": args.n_layers,
            "nope_layers": sum(not r.use_rope for r in args.layer_roles), "cache_bytes": held,
            "full_cache_bytes": full, "fraction": round(held / full, 4)}


def kv_extra(backends: list[str], timeout: float) -> list[dict[str, Any]]:
    from benchmarks.bench_generate import run_child

    return [run_child({"kind": "kv", "backend": b}, timeout) for b in backends]


def moe_extra(opts: argparse.Namespace, backends: list[str], work: Path) -> dict[str, Any]:
    """Decode speed of ours (float32) with 8 and with 64 experts of the same size (equal active
    parameters), 4 layers of the benchmark's size (at most `small`)."""
    from benchmarks.bench_generate import run_child

    size = "tiny" if opts.size == "tiny" and not opts.model else "small"
    out: dict[str, Any] = {"size": size, "layers": 4, "experts": list(MOE_EXPERTS), "runs": []}
    folders = {e: write_model(work / f"moe{e}", synthetic_args(size, num_experts=e, n_layers=4))
               for e in MOE_EXPERTS}
    for backend in backends:
        tps = {}
        for e, folder in folders.items():
            args = synthetic_args(size, num_experts=e, n_layers=4)
            task = {"impl": "ours", "backend": backend, "dtype": "float32", "path": str(folder),
                    "vocab_size": args.vocab_size, "prompt_tokens": 32, "gen_tokens": opts.gen_tokens,
                    "trials": opts.trials, "threads": opts.threads}
            print(f"running moe scaling {backend} E={e} ...", file=sys.stderr, flush=True)
            res = run_child(task, opts.timeout)
            out["runs"].append({"backend": backend, "experts": e, **res})
            tps[e] = res.get("decode_tps")
        if all(tps.values()):
            out[f"{backend}_time_ratio"] = round(tps[MOE_EXPERTS[0]] / tps[MOE_EXPERTS[1]], 3)
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    return out
