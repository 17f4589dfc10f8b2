"""Replaying a compiled step's graph without dynamo (`torch_backend.replay`): gathering the graph's inputs
from the step's arguments, replaying only while every input is the one a guarded call checked, and the
compiled decode step replaying between cache growths with the eager path's logits."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_backend.replay import Graph, GraphReplay, gatherer  # noqa: E402


class _Table:
    def __init__(self, n: int) -> None:
        self.rows = torch.arange(float(n))


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4, bias=False)
        self.table = _Table(6)


class _Cache:
    def __init__(self, n: int) -> None:
        self.keys = torch.zeros(1, n)


NAMES = ["L['tokens']", "L['self']._modules['proj']._parameters['weight']", "L['self'].table.rows",
         "L['self'].table.rows.size()[0]", "L['cache'][0].keys", "L['cache'][0].keys.size()[1]"]


def _local(model: _Model, caches: list[_Cache], tokens: torch.Tensor) -> dict:
    return {"self": model, "tokens": tokens, "cache": caches}


def _step(*inputs):
    """A stand-in compiled graph: its one output depends on every input."""
    tokens, w, rows, n_rows, keys, n_keys = inputs
    return (w.sum() + rows.sum() + keys.sum() + tokens.sum() + n_rows + n_keys,)


def test_gatherer_reads_the_inputs_and_sees_replaced_tensors_and_grown_tables() -> None:
    model, caches, tokens = _Model(), [_Cache(3)], torch.tensor([1])
    gather = gatherer(NAMES, _local(model, caches, tokens))
    values = gather(_local(model, caches, tokens))
    assert values[0] is tokens and values[1] is model.proj.weight and values[2] is model.table.rows
    assert values[3] == 6 and values[4] is caches[0].keys and values[5] == 3
    model.proj.weight = torch.nn.Parameter(torch.ones(4, 4))  # a replaced parameter
    model.table.rows = torch.arange(9.0)  # a grown table
    other = [_Cache(5)]
    values = gather(_local(model, other, tokens))
    assert values[1] is model.proj.weight and values[2] is model.table.rows and values[3] == 9
    assert values[4] is other[0].keys and values[5] == 5


@pytest.mark.parametrize("name", ["G['x']", "L['self'].f(3)", "___odict_getitem(L['self'], 'a')", "L['a'] + 1"])
def test_gatherer_refuses_sources_other_than_plain_accesses(name: str) -> None:
    assert gatherer(["L['tokens']", name], {"tokens": torch.zeros(1), "self": _Model()}) is None


def _checked(model: _Model, caches: list[_Cache], tokens: torch.Tensor) -> GraphReplay:
    local = _local(model, caches, tokens)
    inputs = gatherer(NAMES, local)(local)
    outputs = _step(*inputs)
    replay = GraphReplay.check(Graph(_step, NAMES), inputs, outputs, outputs[0], local, {"tokens"})
    assert replay is not None
    return replay


def test_a_replay_runs_while_the_inputs_are_the_checked_ones() -> None:
    model, caches = _Model(), [_Cache(3)]
    replay = _checked(model, caches, torch.tensor([1]))
    expected = _step(torch.tensor([7]), model.proj.weight, model.table.rows, 6, caches[0].keys, 3)[0]
    assert torch.equal(replay(_local(model, caches, torch.tensor([7]))), expected)  # new tokens of one layout
    assert replay(_local(model, [_Cache(3)], torch.tensor([7]))) is None  # another cache (same shape)
    assert replay(_local(model, caches, torch.tensor([7, 8]))) is None  # tokens of another shape
    assert replay(_local(model, caches, torch.tensor([7], dtype=torch.int32))) is None
    model.table.rows = torch.arange(9.0)  # the table grew
    assert replay(_local(model, caches, torch.tensor([7]))) is None
    with torch.inference_mode():  # another autograd mode than the checked call's
        assert replay(_local(model, caches, torch.tensor([7]))) is None


def test_a_replay_takes_new_caches_laid_out_as_the_checked_ones() -> None:
    """With the caches rebindable, another cache whose tensors have the checked layout (a new generation)
    replays with its own tensors, which become the checked ones; a cache of another layout or kind, or a
    replaced weight, does not replay."""

    class _Ring(_Cache):
        pass

    model, caches = _Model(), [_Cache(3)]
    local = _local(model, caches, torch.tensor([1]))
    inputs = gatherer(NAMES, local)(local)
    outputs = _step(*inputs)
    replay = GraphReplay.check(Graph(_step, NAMES), inputs, outputs, outputs[0], local, {"tokens"},
                               rebind_locals={"cache"}, kinds=lambda loc: tuple(map(type, loc["cache"])))
    new = [_Cache(3)]
    new[0].keys += 2.0
    expected = _step(torch.tensor([7]), model.proj.weight, model.table.rows, 6, new[0].keys, 3)[0]
    assert torch.equal(replay(_local(model, new, torch.tensor([7]))), expected)
    assert replay.refs[-1]() is new[0].keys  # now the checked one
    assert replay(_local(model, caches, torch.tensor([7]))) is not None  # and back: the same layout
    assert replay(_local(model, [_Cache(4)], torch.tensor([7]))) is None  # another layout
    assert replay(_local(model, [_Ring(3)], torch.tensor([7]))) is None  # another kind of cache
    model.proj.weight = torch.nn.Parameter(torch.ones(4, 4))  # not a cache's: never rebound
    assert replay(_local(model, caches, torch.tensor([7]))) is None


def test_a_replay_keeps_no_finished_cache_alive() -> None:
    import gc
    import weakref

    model, caches = _Model(), [_Cache(3)]
    replay = _checked(model, caches, torch.tensor([1]))
    keys = weakref.ref(caches[0].keys)
    del caches
    gc.collect()
    assert keys() is None
    assert replay(_local(model, [_Cache(3)], torch.tensor([1]))) is None


def test_no_replay_of_a_graph_that_is_not_the_whole_step() -> None:
    model, caches, tokens = _Model(), [_Cache(3)], torch.tensor([1])
    local = _local(model, caches, tokens)
    inputs = gatherer(NAMES, local)(local)
    outputs = _step(*inputs)
    graph = Graph(_step, NAMES)
    assert GraphReplay.check(graph, inputs, outputs, outputs[0] + 1, local, {"tokens"}) is None  # result made after
    assert GraphReplay.check(graph, inputs, (*outputs, outputs[0]), outputs[0], local, {"tokens"}) is None
    assert GraphReplay.check(Graph(_step, None), inputs, outputs, outputs[0], local, {"tokens"}) is None
    swapped = [inputs[0], model.proj.weight.clone(), *inputs[2:]]  # an input its source does not give
    assert GraphReplay.check(graph, swapped, outputs, outputs[0], local, {"tokens"}) is None


def test_the_compiled_step_replays_between_growths_with_the_eager_logits() -> None:
    from backends import TorchBackend
    from tiny import CONFIGS, random_weights

    from common.datatypes import TransformerInput
    from torch_backend.graphs import DecodeRunner

    torch._dynamo.reset()
    args = CONFIGS["dense_moe"]
    model = TorchBackend().build(args, random_weights(args, seed=3))
    runner = DecodeRunner(model, graphs=False, compiled=True)
    prompt, steps = [5, 17, 33, 2, 90, 41, 7], 300  # past the global cache's first growth (256 reserved ahead)
    guarded = []
    for generation in range(2):  # a second generation: new caches, replayed from its first step
        eager, compiled = model.make_cache(1), model.make_cache(1)
        with torch.inference_mode():
            for c in (eager, compiled):
                logits = model(TransformerInput(tokens=torch.tensor([prompt]), tokens_position=0), cache=c).logits
            token = logits[:, -1].argmax(-1)
            worst = 0.0
            for position in range(len(prompt), len(prompt) + steps):
                a = model(TransformerInput(tokens=token[:, None], tokens_position=position), cache=eager).logits[:, 0]
                b = runner(compiled, 1, token, np.array([position]))
                for c in compiled:
                    c.advance_together(position + 1)
                worst = max(worst, float((a - b).abs().max()))
                token = a.argmax(-1)
        assert worst < 1e-5, f"generation {generation}: max |replayed - eager| {worst}"
        guarded.append(runner.step.counts["guarded"] - sum(guarded))
    # the second generation's growth replays the first's check (its first step is checked again: the rotation
    # table the first step read grew during the first generation)
    assert guarded[0] >= 2 and guarded[1] == guarded[0] - 1, guarded
    counts = runner.step.counts
    assert counts["guarded"] + counts["replayed"] == 2 * steps
    assert 2 <= counts["guarded"] <= 8 and counts["replayed"] >= 2 * steps - 8, counts
    # the growing caches' slot counts are integer inputs: replays passed them as tensors made once
    boxed = runner.step._replays[0].boxed
    assert boxed and all(t.dtype == torch.int64 and t.dim() == 0 for _, t in boxed)
    # in inference mode the replays called inductor's generated callable directly
    assert all(r.direct is not None for r in runner.step._replays)


def test_a_new_generation_replays_from_its_first_step() -> None:
    """Generations of one prompt length: only the first ever goes through dynamo's guards; the others'
    caches take the checked ones' places (`GraphReplay._rebind`), with the eager path's logits."""
    from backends import TorchBackend
    from tiny import CONFIGS, random_weights

    from common.datatypes import TransformerInput
    from torch_backend.graphs import DecodeRunner

    torch._dynamo.reset()
    args = CONFIGS["dense_moe"]
    model = TorchBackend().build(args, random_weights(args, seed=4))
    runner = DecodeRunner(model, graphs=False, compiled=True)
    prompt = [5, 17, 33, 2, 90, 41, 7]
    for _ in range(3):  # generations
        eager, compiled = model.make_cache(1), model.make_cache(1)
        with torch.inference_mode():
            for c in (eager, compiled):
                logits = model(TransformerInput(tokens=torch.tensor([prompt]), tokens_position=0), cache=c).logits
            token = logits[:, -1].argmax(-1)
            for position in range(len(prompt), len(prompt) + 6):
                a = model(TransformerInput(tokens=token[:, None], tokens_position=position), cache=eager).logits[:, 0]
                b = runner(compiled, 1, token, np.array([position]))
                for c in compiled:
                    c.advance_together(position + 1)
                assert float((a - b).abs().max()) < 1e-5
                token = a.argmax(-1)
    assert runner.step.counts == {"guarded": 1, "replayed": 17}
