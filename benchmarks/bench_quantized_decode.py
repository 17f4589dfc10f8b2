"""Decode speed and peak memory on MLX of one model as stored (float16), in 8-bit and in 4-bit; prints JSON.

    python -m benchmarks.bench_quantized_decode [--model PATH] [--tokens 64] [--synthetic-gb 0.6]

`--model` defaults to the bundled demo model; `--model synthetic` (the fallback when the demo is
not built) makes a float16 model of `--synthetic-gb` in a temporary folder, deleted after. Each
variant runs in a fresh process, so its peak memory is its own: a prefill of 32 tokens, then
greedy decoding of `--tokens` tokens (the first, which includes the prefill, is not timed). On a
CPU-only MLX the quantized layers compute in float32 (see `mlx_llm.quantize.compute_dtype`), so
these are not Apple silicon figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).parent.parent / "apps" / "demo_model"
PROMPT_TOKENS = 32


def child(path: str, tokens: int) -> dict[str, float]:
    """Load `path`, decode, and report (runs in its own process)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from common.generation import process_peak_memory_gb
    from mlx_llm import load_model
    from mlx_llm.generate import generate_step

    t = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t
    weights_gb = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9
    prompt = [(7 * i + 3) % model.args.vocab_size for i in range(PROMPT_TOKENS)]
    steps = generate_step(model, prompt)
    next(steps)  # prefill and the first token
    t = time.perf_counter()
    for _ in range(tokens):
        next(steps)
    decode_s = time.perf_counter() - t
    return {"weights_gb": round(weights_gb, 3), "load_seconds": round(load_s, 2),
            "decode_tokens_per_s": round(tokens / decode_s, 2),
            "peak_mlx_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
            "peak_rss_gb": round(process_peak_memory_gb() * (1 << 30) / 1e9, 3),
            "device": str(mx.default_device())}


def _run_child(path: Path, tokens: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_quantized_decode", "--child", str(path),
                          "--tokens", str(tokens)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"decoding {path} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_quantized_decode", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="float model folder, or 'synthetic' (default: the demo model if built, else synthetic)")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens to time")
    p.add_argument("--synthetic-gb", type=float, default=0.6)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tokens)))
        return 0

    from apps.convert import convert
    from benchmarks.bench_convert import synthetic_args, write_synthetic
    from common.args import QuantizationArgs

    work = Path(tempfile.mkdtemp(prefix="bench_decode-"))
    try:
        src = Path(args.model) if args.model not in (None, "synthetic") else DEMO
        label = str(src)
        if args.model == "synthetic" or not (src / "config.json").exists():
            src = work / "synthetic"
            label = f"synthetic, {write_synthetic(src, synthetic_args(args.synthetic_gb, dim=1024)) / 1e9:.2f} GB"
        result: dict[str, object] = {"model": label,
                                     "stored": _run_child(src, args.tokens)}
        for bits in (8, 4):
            out = convert(src, work / f"q{bits}", QuantizationArgs(group_size=64, bits=bits))
            result[f"{bits}bit"] = _run_child(out, args.tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
