"""Smoke tests of the benchmark scripts: they run end to end on the tiny synthetic model and report
the fields the README's table is made from. No timing is asserted; the cache memory and the
roofline byte counts are exact and are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tiny import tiny_args

from benchmarks._roofline import active_weights, bytes_per_weight, decode_bytes, kv_bytes
from benchmarks._synthetic import parameter_count, synthetic_args
from common.args import MoEArgs
from common.names import canonical_shapes

ROOT = Path(__file__).resolve().parent.parent


def test_bench_generate_tiny_reports_every_run_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_generate", "--size", "tiny", "--trials", "1",
           "--prompt-tokens", "12", "--gen-tokens", "3", "--dtypes", "float32,q4", "--extras", "kv", "--compile",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert "| impl | backend | dtype |" in proc.stderr  # the markdown table
    assert result["settings"] == {"prompt_tokens": 12, "gen_tokens": 3, "trials": 1, "rounds": 1, "threads": 0,
                                  "device": "cpu"}
    ours = [r for r in result["runs"] if r["impl"] in ("ours", "ours_compiled")]
    assert {(r["impl"], r["backend"], r["dtype"]) for r in ours} >= {
        ("ours", "torch", "float32"), ("ours_compiled", "torch", "float32"), ("ours_compiled", "torch", "q4")}
    for r in ours:
        assert "error" not in r, r
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["load_s"] > 0 and r["peak_rss_gb"] > 0
        assert len(r["tokens"]) == 3 and len(r["decode_tps_trials"]) == 1
    for row in result["ratios"]:
        assert "decode_ratio" in row or "peer_error" in row
    for kv in result["kv_memory"]:
        assert kv["context"] == 16 * kv["chunk"]
        # 2 of 8 layers keep all 16 chunks, 6 keep one: (2 * 16 + 6) / (8 * 16)
        assert kv["fraction"] == round((2 * 16 + 6) / (8 * 16), 4)


def test_membw_reports_positive_bandwidths() -> None:
    from benchmarks.membw import measure

    result = measure(mb=8, trials=1)
    assert result["roofline_gbps"] > 0 and result["read_gbps"] > 0 and result["copy_gbps"] > 0


def test_active_weights_count_what_a_decode_step_reads() -> None:
    args = tiny_args()
    shapes = canonical_shapes(args)
    total = sum(int(np.prod(s)) for s in shapes.values())
    V, D = args.vocab_size, args.dim
    # Every expert and the whole embedding table, less what one step does not read.
    assert active_weights(args, all_experts=True) == total - (V - 1) * D
    E, F = args.num_experts, args.moe_hidden_dim
    unread = len(args.moe_layers) * (E - args.moe_args.top_k) * 3 * F * D
    assert active_weights(args) == total - (V - 1) * D - unread


def test_decode_bytes_add_the_cache_each_layer_reads() -> None:
    args = tiny_args()  # chunk 8, layer 3 global
    per_position = 2 * args.n_kv_heads * args.head_dim * 4
    # position 20: chunked layers hold 20 % 8 + 1 = 5 positions, the global one 21
    assert kv_bytes(args, 20, 1, 4) == per_position * (3 * 5 + 21)
    assert decode_bytes(args, "float32", 20, 1) == active_weights(args) * 4 + kv_bytes(args, 20, 1, 4)
    assert bytes_per_weight("q4") == 0.5 + 8 / 64 and bytes_per_weight("bfloat16") == 2


def test_synthetic_sizes_follow_mlx_lm_layer_pattern() -> None:
    medium = synthetic_args("medium")
    assert 0.5e9 <= parameter_count(medium) <= 1e9
    assert 1.8e9 <= parameter_count(synthetic_args("large")) <= 2e9
    for size in ("tiny", "small", "medium", "large"):
        args = synthetic_args(size)
        assert args.rope_layers == tuple((i + 1) % 4 != 0 for i in range(args.n_layers))
        assert args.moe_args == MoEArgs(num_experts=args.num_experts, top_k=1, interleave_moe_layer_step=1)


def test_rounds_merge_into_medians_over_every_trial() -> None:
    from benchmarks.bench_generate import merge_rounds

    a = {"load_s": 1.0, "prefill_tps_trials": [10.0, 30.0], "decode_tps_trials": [1.0, 2.0], "peak_rss_gb": 1.0,
         "membw_gbps": 20.0, "tokens": [1]}
    b = {"load_s": 3.0, "prefill_tps_trials": [20.0], "decode_tps_trials": [3.0], "peak_rss_gb": 2.0,
         "membw_gbps": 30.0, "tokens": [1]}
    merged = merge_rounds([a, {"error": "timed out"}, b])
    assert (merged["prefill_tps"], merged["decode_tps"], merged["load_s"]) == (20.0, 2.0, 2.0)
    assert (merged["peak_rss_gb"], merged["membw_gbps"], merged["rounds"]) == (2.0, 25.0, 2)
    assert merge_rounds([{"error": "x"}]) == {"error": "x"}


def test_bench_batch_tiny_reports_every_batch_and_ratio(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_batch", "--size", "tiny", "--batches", "1,2", "--prompt-tokens",
           "12", "--gen-tokens", "4", "--runs", "torch:float32,mlx:float32", "--peer-batch", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "| impl | backend | dtype | batch |" in proc.stderr
    ours = [r for r in result["runs"] if r["impl"] == "ours"]
    assert {(r["backend"], r["dtype"]) for r in ours} >= {("torch", "float32")}
    for r in ours:
        assert set(r["batches"]) == {"1", "2"}, r
        for m in r["batches"].values():
            assert m["tokens"] in (4, 8) and m["decode_tps"] > 0 and m["e2e_tps"] > 0 and m["ttft_p95_s"] > 0
    for r in result["runs"]:
        if r["impl"] == "mlx_lm":
            assert r["sequential"]["tokens"] == 8 and ("batch_generate_s" in r or "batch_generate_error" in r)
    assert all("decode_vs_batch1" in row for row in result["ratios"])


def test_bench_server_tiny_reports_every_level() -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_server", "--size", "tiny", "--servers", "ours-torch", "--requests",
           "3", "--prompt-tokens", "12", "--system-tokens", "6", "--gen-tokens", "4", "--concurrency", "1,2",
           "--port", "8790"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert "| server | concurrency |" in proc.stderr
    (run,) = result["runs"]
    assert run["server"] == "ours-torch" and [x["concurrency"] for x in run["levels"]] == [1, 2]
    for x in run["levels"]:
        assert x["requests"] == 3 and x["tokens"] == 12 and x["tokens_per_s"] > 0 and x["ttft_p95_s"] > 0
    assert "ours-torch_c2_vs_c1" in result["ratios"]


def test_server_load_prompts_share_the_system_part_only() -> None:
    from benchmarks._http_load import requests_for

    a, b = requests_for(100, 3, 10, 4, 0), requests_for(100, 3, 10, 4, 1)
    words = [p.split() for p in a + b]
    assert all(len(w) == 10 and w[:4] == words[0][:4] for w in words)
    assert len({tuple(w[4:]) for w in words}) == 6


def test_bench_distributed_tiny_reports_one_and_two_ranks() -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_distributed", "--size", "tiny", "--backends", "torch",
           "--prompt-tokens", "12", "--gen-tokens", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert "| backend | ranks |" in proc.stderr
    assert [(r["backend"], r["ranks"]) for r in result["runs"]] == [("torch", 1), ("torch", 2)]
    for r in result["runs"]:
        assert "error" not in r, r.get("stderr", r["error"])  # the child's own words and the launcher's summary
        assert len(r["per_rank"]) == r["ranks"] and r["same_tokens"]
        assert all(x["decode_tps"] > 0 and x["peak_rss_gb"] > 0 for x in r["per_rank"])
    assert result["runs"][0]["per_rank"][0]["tokens"] == result["runs"][1]["per_rank"][0]["tokens"]
