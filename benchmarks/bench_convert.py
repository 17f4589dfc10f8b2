"""Peak memory of `apps.convert` on a synthetic float16 checkpoint of at least 4 GB; prints JSON.

    python -m benchmarks.bench_convert [--gb 4.2] [--bits 4] [--no-peer] [--keep DIR]

The checkpoint (Hugging Face layout, fused `gate_up_proj` experts, 2 GB shards, float16 Gaussian
weights) is generated into a temporary folder, converted in a child process whose peak resident
memory (ru_maxrss) is read when it exits, then deleted. The target is under 1.5 GB whatever the
model size. With mlx-lm installed its own `convert` runs on the same folder, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from apps.convert_io import Entry, ShardWriter
from benchmarks._synthetic import write_tokenizer
from common.args import ModelArgs, MoEArgs
from common.checkpoint import canonical_to_hf
from common.hf_config import to_hf_text_config
from common.names import canonical_shapes

RSS_LIMIT_GB = 1.5


def synthetic_args(target_gb: float, dim: int = 2048) -> ModelArgs:
    """A Llama 4 shaped model (16 experts every other layer, NoPE every 4th layer) of at least
    `target_gb` in float16: layers are added, 4 at least."""
    layers = 4
    while True:
        args = ModelArgs(
            dim=dim, n_layers=layers, n_heads=dim // 128, n_kv_heads=dim // 512, vocab_size=32768, head_dim=128,
            ffn_hidden_dim=4 * dim, moe_hidden_dim=2 * dim, rope_theta=500000.0, attention_chunk_size=8192,
            use_qk_norm=True, attn_temperature_tuning=True,
            moe_args=MoEArgs(num_experts=16, top_k=1, interleave_moe_layer_step=2),
            rope_layers=tuple((i + 1) % 4 != 0 for i in range(layers)),
            moe_layers=tuple(range(1, layers, 2)), max_seq_len=4096)
        if 2 * sum(int(np.prod(s)) for s in canonical_shapes(args).values()) >= target_gb * 1e9:
            return args
        layers += 2


def _hf_entries(args: ModelArgs) -> list[Entry]:
    """The text tensors of a Llama4ForConditionalGeneration checkpoint, experts as HF's fused
    [E, D, 2F] gate_up_proj and [E, F, D] down_proj."""
    shapes = canonical_shapes(args)
    plain = {n: n for n in shapes if ".experts." not in n}
    names = canonical_to_hf(plain, args, conditional=True)  # a pure renaming outside the experts
    entries = [Entry(h, "F16", shapes[names[h]]) for h in names]
    E, D, F = args.num_experts, args.dim, args.moe_hidden_dim
    for i in args.moe_layers:
        p = f"language_model.model.layers.{i}.feed_forward.experts."
        entries += [Entry(p + "gate_up_proj", "F16", (E, D, 2 * F)), Entry(p + "down_proj", "F16", (E, F, D))]
    return entries


def write_synthetic(folder: Path, args: ModelArgs, shard_bytes: int = 2 << 30, seed: int = 0) -> int:
    """Write the checkpoint with bounded memory (one row block at a time); returns its size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, shards, size = _hf_entries(args), [[]], 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(e)
        size += e.nbytes
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(folder / name, shard) as writer:
            for e in shard:
                rows, cols = int(np.prod(e.shape[:-1])), e.shape[-1]
                step = max(1, (1 << 22) // cols)
                for r in range(0, rows, step):
                    n = min(step, rows - r)
                    block = np.ones((n, cols), np.float16) if e.name.endswith("norm.weight") else (
                        rng.standard_normal((n, cols), dtype=np.float32) * 0.02).astype(np.float16)
                    writer.write(e.name, r, block)
            writer.finish()
        weight_map.update({e.name: name for e in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "torch_dtype": "float16",
              "text_config": to_hf_text_config(args)}
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, args.vocab_size)
    return sum(e.nbytes for e in entries)


def measure(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`; its wall time and peak resident memory (GB, from the child's own rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(usage.ru_maxrss * scale / 1e9, 3)}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_convert", description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=4.2, help="size of the synthetic float16 checkpoint (>= 4)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--no-peer", action="store_true", help="skip mlx-lm's convert")
    p.add_argument("--dir", default=None, help="where to make the temporary folder (default: system temp)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir))
    free_gb = shutil.disk_usage(work).free / 1e9
    print(f"free disk at {work}: {free_gb:.1f} GB", file=sys.stderr)
    if free_gb < args.gb * 2.6:
        raise SystemExit(f"need about {args.gb * 2.6:.1f} GB free for the source and outputs")
    result: dict[str, object] = {"limit_gb": RSS_LIMIT_GB, "bits": args.bits}
    try:
        model_args = synthetic_args(args.gb)
        t = time.perf_counter()
        result["source_gb"] = round(write_synthetic(work / "src", model_args) / 1e9, 3)
        result["generate_seconds"] = round(time.perf_counter() - t, 1)
        ours = measure([sys.executable, "-m", "apps.convert", "--model", str(work / "src"), "--out",
                        str(work / "ours"), "-q", "--q-bits", str(args.bits)])
        result["convert"] = ours | {"output_gb": round(_folder_bytes(work / "ours") / 1e9, 3),
                                    "ok": ours["peak_rss_gb"] < RSS_LIMIT_GB}
        shutil.rmtree(work / "ours")
        if not args.no_peer and importlib.util.find_spec("mlx_lm") is not None:
            peer = measure([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(work / "src"),
                            "--mlx-path", str(work / "peer"), "-q", "--q-bits", str(args.bits)])
            result["mlx_lm_convert"] = peer
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result["convert"]["ok"] else 1  # type: ignore[index]


if __name__ == "__main__":
    raise SystemExit(main())
