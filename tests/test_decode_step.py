"""The torch backend's fixed-shape decode step (`decode_rows`, what CUDA graphs capture): the same
logits as the forward path within 1e-5 and the same greedy tokens over 64 steps across chunk
boundaries, for one row and for four rows at different positions; no host reads or writes inside
the step; the row pool and the graph runner give continuous batching's tokens. With CUDA, the same
through captured graphs, and logits within 1e-4 of transformers."""

from __future__ import annotations

import numpy as np
import pytest
from backends import TorchBackend, available
from byte_tokenizer import ByteTokenizer
from test_batch_generator import PROMPTS, run
from test_batch_model import padded
from tiny import CONFIGS, random_weights

pytestmark = pytest.mark.skipif("torch" not in available(), reason="torch is not installed")
STEPS = 64


def _two_paths(args, lengths: list[int], device: str = "cpu", graphs: bool = False):
    """Greedy decoding of prompts of `lengths` by the forward path and by `decode_rows` (directly, or
    through the graph runner); per step logits [B, V] of each, and the tokens."""
    import torch

    from torch_backend.graphs import DecodeRunner

    backend = TorchBackend()
    model = backend.build(args, random_weights(args, seed=3)).to(device)
    rng = np.random.default_rng(9)
    tokens, lens = padded([rng.integers(0, args.vocab_size, n) for n in lengths])
    B = len(lengths)
    caches = [model.make_cache(B), model.make_cache(B)]
    runner = DecodeRunner(model, graphs=graphs)
    out = []
    with torch.inference_mode():
        from common.datatypes import TransformerInput

        for c in caches:
            first = model(TransformerInput(tokens=torch.from_numpy(tokens).to(device), tokens_position=np.zeros(B, int),
                                           lengths=lens), cache=c, last_only=True).logits[:, 0]
        steps, positions = [first.argmax(-1)] * 2, lens.copy()
        for _ in range(STEPS):
            inp = TransformerInput(tokens=steps[0][:, None], tokens_position=positions)
            a = model(inp, cache=caches[0]).logits[:, 0]
            b = runner(caches[1], B, steps[1], positions)
            for c in caches[1]:
                c.offsets = positions + 1
            out.append((a.float().cpu().numpy(), b.float().cpu().numpy()))
            steps, positions = [a.argmax(-1), b.argmax(-1)], positions + 1
    return out


@pytest.mark.parametrize("name", ["dense_moe", "all_moe"])
@pytest.mark.parametrize("lengths", [[11], [3, 17, 40, 70]])
def test_fixed_shape_decode_equals_the_forward_path(name: str, lengths: list[int]) -> None:
    pairs = _two_paths(CONFIGS[name], lengths)
    worst = max(float(np.abs(a - b).max()) for a, b in pairs)
    assert worst < 1e-5, f"max |decode_rows - forward| over {STEPS} steps: {worst}"
    np.testing.assert_array_equal([a.argmax(-1) for a, _ in pairs], [b.argmax(-1) for _, b in pairs])


def test_the_step_reads_nothing_back_and_keeps_no_host_state(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from common.datatypes import TransformerInput

    args = CONFIGS["all_moe"]
    model = TorchBackend().build(args, random_weights(args, seed=3))
    cache = model.make_cache(4)
    with torch.inference_mode():
        model(TransformerInput(tokens=torch.ones((4, 9), dtype=torch.long), tokens_position=0), cache=cache)
        model.prepare_decode(cache, 64)
        offsets = [c.offsets.copy() for c in cache]
        storage = [c.keys.data_ptr() for c in cache]

        def refuse(*_a, **_k):
            raise AssertionError("a host read inside the decode step")

        for name in ("item", "tolist", "nonzero", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        logits = model.decode_rows(torch.tensor([1, 2, 3, 4]), torch.tensor([9, 12, 30, 40]), cache)
        monkeypatch.undo()
    assert logits.shape == (4, args.vocab_size)
    assert all((c.offsets == o).all() for c, o in zip(cache, offsets, strict=True))
    assert [c.keys.data_ptr() for c in cache] == storage


def _scenario(model, pooled: bool) -> tuple[list, list]:
    from torch_backend import BatchGenerator
    from torch_backend.batch import TorchBatchOps
    from torch_backend.graphs import RowPool

    gen = BatchGenerator(model, ByteTokenizer(), max_batch=8, prefill_step_size=16)
    gen.ops = TorchBatchOps(model, 8, pooled=pooled)
    uids = {0: gen.insert(PROMPTS[0], 40), 1: gen.insert(PROMPTS[1], 40)}
    schedule = {10: lambda g: uids.__setitem__(2, g.insert(PROMPTS[2], 40, stop=[7])),
                25: lambda g: uids.__setitem__(3, g.insert(PROMPTS[3], 20)),
                30: lambda g: g.remove(uids[1])}
    tokens, ends, _ = run(gen, schedule)
    assert isinstance(gen._cache, RowPool) == pooled or gen._cache is None
    return [tokens[uids[i]] for i in range(4)], [ends[uids[i]].finish_reason if uids[i] in ends else None
                                                 for i in range(4)]


def test_row_pool_gives_continuous_batchings_tokens() -> None:
    """Rows joining after 10 and 25 steps and leaving (stop token, max_tokens, remove), decoded from the
    row pool by the runner (the CUDA path, here without graphs), get the plain generator's tokens."""
    args = CONFIGS["dense_moe"]
    model = TorchBackend().build(args, random_weights(args, seed=4))
    results = [_scenario(model, pooled) for pooled in (False, True)]
    assert results[0] == results[1]


@pytest.mark.skipif("torch" not in available() or not __import__("torch").cuda.is_available(),
                    reason="needs CUDA")
def test_cuda_graphs_equal_eager_decoding_and_transformers() -> None:
    import torch
    from hf_ref import hf_logits, hf_model

    args = CONFIGS["dense_moe"]
    pairs = _two_paths(args, [3, 17, 40, 70], device="cuda", graphs=True)
    worst = max(float(np.abs(a - b).max()) for a, b in pairs)
    assert worst < 1e-4
    np.testing.assert_array_equal([a.argmax(-1) for a, _ in pairs], [b.argmax(-1) for _, b in pairs])
    weights = random_weights(args, seed=3)
    model = TorchBackend().build(args, weights).to("cuda")
    prompt = np.random.default_rng(1).integers(0, args.vocab_size, (1, 30))
    from torch_backend import generate_step

    steps = generate_step(model, prompt[0].tolist())
    tokens = [next(steps) for _ in range(12)]
    ref = hf_logits(hf_model(args, weights), np.concatenate([prompt, [tokens[:-1]]], axis=1))[0, 29:]
    np.testing.assert_array_equal(ref.argmax(-1), tokens)
    assert torch.cuda.is_available()
