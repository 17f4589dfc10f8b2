"""The torch CPU decode step through `torch.compile` (`torch_backend.compiled`): logits within 1e-5 of
the eager forward path and the same greedy tokens, one compiled graph across expert choices, chunk
boundaries and a global cache's growth (top-1 and top-2 routing), compiled while loading and reused
by generation; the same tokens as the eager step
in bfloat16 and on a packed 4-bit folder; the eager step, with a warning, where compiling fails; and
`apps.generate --compile` printing the eager run's text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from backends import TorchBackend, available
from tiny import CONFIGS, random_weights

pytestmark = pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 33, 2, 90, 41, 7, 64, 3, 11, 28, 99, 45, 8, 21, 60, 12, 77, 30, 1]


def _paths(model, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Greedy decoding after PROMPT by the eager forward path and by the compiled step: per-step logits [V] of each."""
    import torch

    from common.datatypes import TransformerInput
    from torch_backend.graphs import DecodeRunner

    runner = DecodeRunner(model, graphs=False, compiled=True)
    caches = [model.make_cache(1), model.make_cache(1)]
    out = []
    with torch.inference_mode():
        for c in caches:
            first = model(TransformerInput(tokens=torch.tensor([PROMPT]), tokens_position=0), cache=c,
                          last_only=True).logits[:, 0]
        tokens, position = [first.argmax(-1)] * 2, len(PROMPT)
        for _ in range(steps):
            inp = TransformerInput(tokens=tokens[0][:, None], tokens_position=position)
            a = model(inp, cache=caches[0]).logits[:, 0]
            b = runner(caches[1], 1, tokens[1], np.array([position]))
            for c in caches[1]:
                c.offsets = np.array([position + 1])
            out.append((a.float().numpy()[0], b.float().numpy()[0]))
            tokens, position = [a.argmax(-1), b.argmax(-1)], position + 1
    return out


@pytest.mark.parametrize("name", ["dense_moe", "all_moe"])
def test_compiled_step_equals_the_forward_path_in_one_graph(name: str) -> None:
    import torch

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    args = CONFIGS[name]
    model = TorchBackend().build(args, random_weights(args, seed=3))
    steps = 250  # positions 20 .. 269: chunk boundaries every 8, and the NoPE layer's cache grows past 256
    pairs = _paths(model, steps)
    worst = max(float(np.abs(a - b).max()) for a, b in pairs)
    assert worst < 1e-5, f"max |compiled - forward| over {steps} steps: {worst}"
    assert [int(a.argmax()) for a, _ in pairs] == [int(b.argmax()) for _, b in pairs]
    assert counters["frames"]["ok"] == 1, f"expected one compiled graph, got {dict(counters['frames'])}"


def _greedy(folder: Path, dtype: str | None, compiled: bool, n: int = 40) -> list[int]:
    from common.sampling import SamplingParams
    from torch_backend import generate_step, load_model

    model = load_model(folder, dtype=dtype, device="cpu", compile_decode=compiled)
    steps = generate_step(model, PROMPT, SamplingParams(temperature=0.0))
    return [next(steps) for _ in range(n)]


def test_load_compiles_and_generation_reuses_the_graph(tmp_path: Path) -> None:
    """`load(compile_decode=True)` compiles while loading; 260 tokens (past a cache growth) add no graph."""
    import torch
    from folders import write_hf
    from torch._dynamo.utils import counters

    from common.sampling import SamplingParams
    from torch_backend import generate_step, load_model

    args = CONFIGS["dense_moe"]
    folder = write_hf(tmp_path / "model", args, random_weights(args, seed=5))
    torch._dynamo.reset()
    counters.clear()
    model = load_model(folder, dtype="float32", device="cpu", compile_decode=True)
    assert counters["frames"]["ok"] == 1
    steps = generate_step(model, PROMPT, SamplingParams(temperature=0.0))
    assert len([next(steps) for _ in range(260)]) == 260
    assert counters["frames"]["ok"] == 1, f"generation compiled again: {dict(counters['frames'])}"


def test_bfloat16_compiled_tokens_equal_eager(tmp_path: Path) -> None:
    from folders import write_hf

    args = CONFIGS["dense_moe"]
    folder = write_hf(tmp_path / "model", args, random_weights(args, seed=5))
    assert _greedy(folder, "bfloat16", compiled=True) == _greedy(folder, "bfloat16", compiled=False)


def test_packed_4bit_compiled_tokens_equal_eager(tmp_path: Path) -> None:
    from apps.convert import convert
    from common.args import QuantizationArgs
    from torch_backend.qweight import kernels_available

    if not kernels_available(4, 32):
        pytest.skip("this torch has no int4 CPU kernel")
    args = CONFIGS["top1_of_8"]
    from folders import write_hf

    src = write_hf(tmp_path / "model", args, random_weights(args, seed=6))
    folder = convert(src, tmp_path / "q4", QuantizationArgs(group_size=32, bits=4), dtype="float32")
    assert _greedy(folder, None, compiled=True) == _greedy(folder, None, compiled=False)


def test_a_failed_compile_decodes_eagerly_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch._dynamo.exc import Unsupported

    import torch_backend.compiled as compiled

    def broken(*_a, **_k):
        raise Unsupported("no C++ compiler")

    monkeypatch.setattr(compiled.torch, "compile", lambda fn, **_k: broken)
    args = CONFIGS["dense_moe"]
    model = TorchBackend().build(args, random_weights(args, seed=3))
    with pytest.warns(RuntimeWarning, match="decoding eagerly: no C\\+\\+ compiler"):
        pairs = _paths(model, 12)
    assert max(float(np.abs(a - b).max()) for a, b in pairs) == 0.0  # the very same eager computation
    assert isinstance(model, torch.nn.Module)


def test_generate_cli_compile_prints_the_eager_text() -> None:
    cmd = [sys.executable, "-m", "apps.generate", "--backend", "torch", "--device", "cpu", "--prompt", "def add(a, b):",
           "--max-tokens", "24", "--no-chat-template"]
    texts = []
    for flags in ([], ["--compile"]):
        out = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Warning" not in out.stderr, out.stderr[-2000:]  # stderr holds the statistics line alone
        texts.append(out.stdout)
    assert texts[0].strip() and texts[0] == texts[1]
