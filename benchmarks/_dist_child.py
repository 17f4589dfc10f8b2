"""One rank of `benchmarks.bench_distributed` (or the single process): load a folder as this rank's
share, time a prefill and greedy decoding, and write tokens/s and peak memory to OUT/rank{r}.json.

    python benchmarks/_dist_child.py BACKEND FOLDER OUT PROMPT_TOKENS GEN_TOKENS
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runners import _peak_gb  # noqa: E402
from benchmarks._synthetic import prompt_ids  # noqa: E402


def main() -> None:
    backend, folder, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    n_prompt, n_gen = int(sys.argv[4]), int(sys.argv[5])
    t = time.perf_counter()
    if backend == "torch":
        from torch_backend import generate_step, load_model
        from torch_backend.distributed import init_world

        world = init_world("cpu")
        model = load_model(folder, device="cpu", world=world)
    else:
        from mlx_llm import generate_step, load_model
        from mlx_llm.distributed import init_world

        world = init_world()
        model = load_model(folder, world=world)
    load_s = time.perf_counter() - t
    ids = prompt_ids(model.args.vocab_size * (1 if world is None else world.size), n_prompt)
    trials = []
    for _ in range(3):  # a warm-up, then two timed runs
        start = time.perf_counter()
        steps = generate_step(model, ids)
        next(steps)
        first = time.perf_counter()
        tokens = [next(steps) for _ in range(n_gen - 1)]
        end = time.perf_counter()
        trials.append({"prefill_tps": n_prompt / (first - start), "decode_tps": (n_gen - 1) / (end - first)})
    best = {k: round(max(x[k] for x in trials[1:]), 2) for k in trials[0]}
    rank = 0 if world is None else world.rank
    (out / f"rank{rank}.json").write_text(json.dumps(best | {"load_s": round(load_s, 2), "tokens": tokens[:8]}
                                                  | _peak_gb(backend)))
    if world is not None:
        # every rank got here: the group torn down together, while the interpreter is fully alive (left to
        # the exit handler, a gloo group aborted a rank now and then: "terminate called without an active
        # exception")
        world.close()


if __name__ == "__main__":
    main()
