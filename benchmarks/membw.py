"""This machine's memory bandwidth, the roofline for decoding (which streams every active weight once
per token); prints JSON.

    python -m benchmarks.membw [--mb 512] [--trials 7]

`read_gbps` sums a float32 buffer far larger than the caches (the access pattern of a
matrix-vector product: every byte read once, nothing written back); `matvec_gbps` times a float32
matrix-vector product over a matrix of that size; `copy_gbps` counts read + written bytes of a
copy. Each is the median of `trials` runs, for each thread count from 1 to the core count;
the best thread count is what the machine can give, and `roofline_gbps` is the best of read and
matvec. Uses torch when installed, else numpy (one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable


def _median_seconds(fn: Callable[[], object], trials: int) -> float:
    fn()  # first touch and warm-up
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _torch_rates(nbytes: int, trials: int) -> dict[str, dict[int, float]]:
    import torch

    n = nbytes // 4
    a = torch.rand(n)
    b = torch.empty_like(a)
    side = int(n**0.5)
    w, x = a[: side * side].view(side, side), torch.rand(1, side)  # [side, side], [1, side]
    rates: dict[str, dict[int, float]] = {"read": {}, "matvec": {}, "copy": {}}
    old = torch.get_num_threads()
    try:
        for threads in range(1, (os.cpu_count() or 1) + 1):
            torch.set_num_threads(threads)
            rates["read"][threads] = a.nbytes / _median_seconds(a.sum, trials) / 1e9
            rates["matvec"][threads] = w.nbytes / _median_seconds(lambda: x @ w.T, trials) / 1e9
            rates["copy"][threads] = 2 * a.nbytes / _median_seconds(lambda: b.copy_(a), trials) / 1e9
    finally:
        torch.set_num_threads(old)
    return rates


def _numpy_rates(nbytes: int, trials: int) -> dict[str, dict[int, float]]:
    import numpy as np

    a = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    return {"read": {1: a.nbytes / _median_seconds(a.sum, trials) / 1e9},
            "copy": {1: 2 * a.nbytes / _median_seconds(lambda: np.copyto(b, a), trials) / 1e9}}


def measure(mb: int = 512, trials: int = 7) -> dict[str, object]:
    """Bandwidths in GB/s (1e9 bytes) per access pattern and thread count, and the best of each."""
    try:
        rates, library = _torch_rates(mb << 20, trials), "torch"
    except ImportError:
        rates, library = _numpy_rates(mb << 20, trials), "numpy"
    result: dict[str, object] = {"library": library, "buffer_mb": mb, "trials": trials}
    for kind, by_threads in rates.items():
        result[f"{kind}_gbps"] = round(max(by_threads.values()), 2)
        result[f"{kind}_gbps_by_threads"] = {str(t): round(v, 2) for t, v in by_threads.items()}
    result["roofline_gbps"] = max(result.get("read_gbps", 0.0), result.get("matvec_gbps", 0.0))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.membw", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=512, help="buffer size in MiB (far above the last-level cache)")
    p.add_argument("--trials", type=int, default=7)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.mb, args.trials), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
