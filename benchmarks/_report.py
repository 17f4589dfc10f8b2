"""The benchmark result as markdown tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], json_path: str | None, table: str) -> None:
    """Every benchmark's output: the result as JSON on stdout (and in `json_path` when given), `table`
    (its markdown) on stderr."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    print(table, file=sys.stderr)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def runs_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        if "error" in r:
            rows.append([r["impl"], r["backend"], r["dtype"], "failed: " + r["error"][:80], *[None] * 6])
            continue
        frac = r.get("roofline_fraction")
        rows.append([r["impl"], r["backend"], r["dtype"], r["load_s"], r["prefill_tps"], r["decode_tps"],
                     r.get("peak_mlx_gb", r["peak_rss_gb"]), r["peak_rss_gb"], r.get("membw_gbps"),
                     None if frac is None else f"{100 * frac:.0f}%"])
    return _table(["impl", "backend", "dtype", "load s", "prefill tok/s", "decode tok/s", "peak GB",
                   "peak RSS GB", "bandwidth GB/s", "of roofline"], rows)


def ratios_table(result: dict[str, Any]) -> str:
    rows = [[r.get("impl", "ours"), r["backend"], r["dtype"], r["peer"], r.get("prefill_ratio"), r.get("decode_ratio"),
             r.get("load_ratio"), r.get("greedy_tokens_equal", r.get("peer_error"))] for r in result["ratios"]]
    return _table(["ours", "backend", "dtype", "peer", "prefill ours/peer", "decode ours/peer", "load peer/ours",
                   "greedy tokens equal"], rows)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    parts = [f"**{result['model']}** ({result['parameters'] / 1e6:.1f}M parameters), prompt {s['prompt_tokens']}, "
             f"{s['gen_tokens']} tokens, median of {s['trials']} trials x {s.get('rounds', 1)} rounds",
             runs_table(result), ratios_table(result)]
    bw = result.get("membw", {})
    if "roofline_gbps" in bw:
        parts.append(f"memory bandwidth (roofline): {bw['roofline_gbps']} GB/s")
    for kv in result.get("kv_memory", []):
        if "fraction" in kv:
            parts.append(f"KV memory ({kv['backend']}), context {kv['context']} = {kv['context'] // kv['chunk']} "
                         f"chunks, {kv['nope_layers']} of {kv['layers']} layers NoPE: {100 * kv['fraction']:.1f}% "
                         f"of a cache keeping every position")
    moe = result.get("moe_scaling", {})
    for key, v in moe.items():
        if key.endswith("_time_ratio"):
            parts.append(f"MoE decode time, {moe['experts'][1]} vs {moe['experts'][0]} experts of equal active "
                         f"size ({key.split('_')[0]}): {v}x")
    return "\n\n".join(parts)
