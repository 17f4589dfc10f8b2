"""One rank of a tensor-parallel test run, started by torchrun or mlx.launch (see test_distributed.py):
loads a model folder as its share, runs the checks' computations and writes what it saw to
OUT/rank{r}.json. Run alone (no launcher), it writes the single-process reference to OUT/single.json.

    python tests/dist_worker.py BACKEND FOLDER OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [5, 17, 33, 2, 90, 41, 7, 64, 3, 11, 28, 99, 45]  # crosses chunk boundaries with chunk 8
ROWS = ([3, 8, 1], [9, 4, 22, 71, 6, 13, 50, 2, 8, 19, 44])  # two rows at different positions
STEPS = 32


def torch_side(folder: str, opened: list[str]) -> tuple[dict, int, int]:
    import importlib

    import torch

    load_module = importlib.import_module("torch_backend.load")  # the module (the package exports `load`)
    from common.datatypes import TransformerInput
    from torch_backend import generate_step, load_model
    from torch_backend.distributed import init_world

    real = load_module.read_pth
    load_module.read_pth = lambda p: (opened.append(Path(p).name), real(p))[1]
    world = init_world("cpu")
    # Tensor-parallel ranks expand quantized folders; so does the single-process reference it is checked against.
    model = load_model(folder, dtype="float32", device="cpu", world=world, dequantize=True)

    def forward(tokens, position=0, cache=None, lengths=None):
        with torch.inference_mode():
            inp = TransformerInput(tokens=torch.tensor(tokens), tokens_position=position, lengths=lengths)
            return model(inp, cache=cache).logits.numpy()

    held = sum(p.numel() * p.element_size() for p in model.parameters())
    return _checks(model, forward, generate_step), (0 if world is None else world.rank), held


def mlx_side(folder: str, opened: list[str]) -> tuple[dict, int, int]:
    import importlib

    import mlx.core as mx

    torch_load = importlib.import_module("torch_backend.load")
    from common.datatypes import TransformerInput
    from mlx_llm import generate_step, load_model
    from mlx_llm.distributed import init_world

    real = torch_load.read_pth
    torch_load.read_pth = lambda p: (opened.append(Path(p).name), real(p))[1]
    world = init_world()
    model = load_model(folder, dtype="float32", world=world)

    def forward(tokens, position=0, cache=None, lengths=None):
        inp = TransformerInput(tokens=mx.array(tokens), tokens_position=position, lengths=lengths)
        return np.array(model(inp, cache=cache).logits)

    from mlx.utils import tree_flatten

    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return _checks(model, forward, generate_step), (0 if world is None else world.rank), held


def _checks(model, forward, generate_step) -> dict:
    out = {"logits": forward([PROMPT]).tolist()}
    steps = generate_step(model, PROMPT)
    out["greedy"] = [next(steps) for _ in range(STEPS)]
    lengths = np.array([len(r) for r in ROWS])
    tokens = np.zeros((2, lengths.max()), dtype=np.int64)
    for i, r in enumerate(ROWS):
        tokens[i, : len(r)] = r
    cache = model.make_cache(2)
    rows = [forward(tokens, np.zeros(2, np.int64), cache, lengths)[np.arange(2), lengths - 1]]
    positions = lengths.copy()
    for _ in range(12):  # both rows decode, each at its own position
        rows.append(forward(np.array([[7], [9]]), positions, cache)[:, 0])
        positions = positions + 1
    out["rows"] = np.stack(rows).tolist()
    return out


def main() -> None:
    backend, folder, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    opened: list[str] = []
    result, rank, held = (torch_side if backend == "torch" else mlx_side)(folder, opened)
    result |= {"opened": sorted(set(opened)), "param_bytes": held}
    name = "single.json" if "WORLD_SIZE" not in __import__("os").environ and backend == "torch" else None
    if backend == "mlx":
        import mlx.core as mx

        name = f"rank{rank}.json" if mx.distributed.init().size() > 1 else "single.json"
    elif name is None:
        name = f"rank{rank}.json"
    (dest / name).write_text(json.dumps(result))
    if backend == "torch":
        from torch_backend.distributed import close_world

        close_world()


if __name__ == "__main__":
    main()
