"""A compiled decode step's graph called directly, without dynamo's work around each call.

A call through `torch.compile` checks its guards, evaluates where each graph input comes from and
passes the inputs through several Python wrappers: measured on a 2-core x86 CPU (small benchmark
model, 4-bit), 1.69-1.78 ms a step against 1.31-1.41 ms for the compiled graph itself. Between cache
growths every step passes the very same tensors (weights, caches, rotation tables) and only new
token and position tensors of one shape, so after one guarded call has run the graph, `GraphReplay`
gathers the same inputs itself and calls the graph directly, for as long as every input is the one
that call checked (the same tensor object, or for tokens and positions a tensor of the same shape,
dtype and layout). A new generation's caches, laid out as the checked ones and of the same kinds, take
their places (`GraphReplay._rebind`); any other input (a grown table, a replaced weight) goes through the
guarded call again.

The graph must be the whole step: one graph, whose single output is the step's result, and no
Python side effects besides its tensors' (dynamo would replay those after the graph; a replay would
not). `GraphReplay.check` verifies the first two on the guarded call it starts from.
"""

from __future__ import annotations

import operator
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_BASE = re.compile(r"L\['([A-Za-z_]\w*)'\]")
# one access after the base: an attribute, a string key, an index, or a tensor's size()/stride()
_ACCESS = re.compile(r"\.(?:size|stride)\(\)|\.[A-Za-z_]\w*|\['[A-Za-z_0-9.]*'\]|\[\d+\]")

Gather = Callable[[dict[str, Any]], tuple]
Kinds = Callable[[dict[str, Any]], Any]  # what must stay equal for rebindable inputs to change


def _accesses(name: str) -> tuple[str, list[str]] | None:
    """A source name as its local and its chain of accesses; None where it is not such a chain."""
    base = _BASE.match(name)
    if base is None:
        return None
    out, pos = [], base.end()
    while pos < len(name):
        access = _ACCESS.match(name, pos)
        if access is None:
            return None
        out.append(access.group())
        pos = access.end()
    return base.group(1), out


def _apply(obj: Any, access: str) -> Any:
    if access.endswith("()"):
        return getattr(obj, access[1:-2])()
    if access.startswith("."):
        return getattr(obj, access[1:])
    key = access[1:-1]
    return obj[int(key)] if key.isdigit() else obj[key[1:-1]]


def gatherer(names: Sequence[str], local: dict[str, Any], held: Sequence[str] = ("self",),
             made: dict | None = None) -> Gather | None:
    """A function of a frame's locals `L` returning the values of `names` (dynamo's source expressions
    for the graph inputs, such as "L['cache'][3].keys.size()[2]") as one tuple, each shared prefix
    evaluated once; None where a name is not a chain of plain accesses from a local.

    Chains from the locals in `held` (the model) are walked now, in `local`, as far as the object
    before the first tensor on them (a module, its parameter dict, a growing table): each call then
    reads only the rest, so it sees replaced tensors and grown tables but not replaced modules.
    `made` keeps the parsed names and generated code between calls (making them takes milliseconds)."""
    chains = None if made is None else made.get(tuple(names))
    if chains is None:
        chains = [_accesses(name) for name in names]
        if made is not None:
            made[tuple(names)] = chains
    if any(chain is None for chain in chains):
        return None
    walked: dict[str, Any] = {}  # a held chain's prefix -> its object, each walked once
    parents, splits = [], []
    for base, accesses in chains:
        if base not in held:
            continue
        expr, obj, i = base, local[base], 0
        while i < len(accesses) - 1:
            expr += accesses[i]
            if expr not in walked:
                walked[expr] = _apply(obj, accesses[i])
            if isinstance(walked[expr], torch.Tensor):
                break
            obj, i = walked[expr], i + 1
        parents.append(obj)
        splits.append(i)
    key = (tuple(names), tuple(held), tuple(splits))
    bind = None if made is None else made.get(key)
    if bind is None:
        bind = _bind(chains, held, splits)
        if made is not None:
            made[key] = bind
    return bind(*parents)


def _bind(chains: list, held: Sequence[str], splits: list[int]) -> Callable[..., Gather]:
    """The code of `gatherer`'s function, taking the held chains' parents p0, p1, ... (split as given)."""
    lines: list[str] = []
    known: dict[str, str] = {}  # expression -> the variable holding it
    leaves, held_seen = [], 0
    for base, accesses in chains:
        expr = f"L[{base!r}]"
        if base in held:
            expr = f"p{held_seen}"
            known[expr] = expr
            accesses = accesses[splits[held_seen]:]
            held_seen += 1
        elif expr not in known:
            known[expr] = f"v{len(known)}"
            lines.append(f"{known[expr]} = {expr}")
        for access in accesses:
            parent, expr = known[expr], expr + access
            if expr not in known:
                known[expr] = f"v{len(known)}"
                lines.append(f"{known[expr]} = {parent}{access}")
        leaves.append(known[expr])
    body = "".join(f"        {line}\n" for line in lines)
    source = (f"def bind({', '.join(f'p{i}' for i in range(held_seen))}):\n"
              f"    def gather(L):\n{body}        return ({', '.join(leaves)},)\n    return gather\n")
    scope: dict[str, Any] = {}
    exec(compile(source, "<graph inputs>", "exec"), scope)  # only the accesses `_ACCESS` matched
    return scope["bind"]


@dataclass
class Graph:
    """One compiled graph: `fn(*inputs)` -> its outputs, and how its inputs come from a frame's locals."""

    fn: Callable[..., Any]
    names: list[str] | None  # each input's source (None: not all known)
    made: dict = field(default_factory=dict)  # `gatherer`'s code for these names


def _getter(indices: list[int]) -> Callable[[Sequence[Any]], tuple]:
    """The items at `indices` of a sequence, as a tuple (whatever their number)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return lambda seq: tuple(seq[i] for i in indices)


def _layout(t: torch.Tensor) -> tuple:
    return t.dtype, t.device, t.shape, t.stride(), t.requires_grad, t.is_inference()


def _modes() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def _direct(fn: Callable[..., Any], modes: tuple[bool, bool]) -> Callable[[list], Any] | None:
    """Inductor's generated callable under `fn` (it takes the inputs as one list), where calling it alone does
    what `fn` does: `fn` is autograd's and dynamo's wrapping of it (`torch.compile`'s compiled graph copies its
    attributes onto that wrapping), whose work around a call in inference mode is to bump the version
    counters of mutated inputs (inference tensors have none) and to re-align inputs it lists in
    `inputs_to_check` (none here). Measured on the small benchmark model, 2-core x86 CPU, greedy decodes with
    both ways timed alternately in one process: a 4-bit step 1.299 -> 1.266 ms, float32 3.687 -> 3.652.
    None (call `fn`) where it does not apply."""
    direct = getattr(fn, "current_callable", None)
    if not callable(direct) or not modes[1] or getattr(fn, "inputs_to_check", None):
        return None
    return direct


class GraphReplay:
    """`graph` called with the inputs one guarded call passed it, gathered again each step (see the module notes)."""

    def __init__(self, graph: Graph, gather: Gather, inputs: Sequence[Any], fresh: set[int],
                 box_ints: bool = False, rebindable: set[int] = frozenset(), kinds: Kinds | None = None,
                 local: dict[str, Any] | None = None) -> None:
        self.fn, self.gather, self.modes = graph.fn, gather, _modes()
        self.direct = _direct(graph.fn, self.modes)
        # `box_ints`: a cpp_wrapper graph, whose Python wrapper makes each integer input a 0-dim tensor
        # (torch.tensor, about 4 us each) on every call; made once here instead, as replays pass the very
        # integers checked (6 per step on the small model: a 4-bit step about 25 us shorter).
        self.boxed = [(i, torch.tensor(x)) for i, x in enumerate(inputs) if box_ints and type(x) is int]
        # The checked inputs: tensors by weak reference (a finished generation's caches are not kept alive).
        same = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and i not in fresh]
        self.same, self.refs = _getter(same), [weakref.ref(inputs[i]) for i in same]
        equal = [i for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)]
        self.equal = _getter(equal)
        self.values = self.equal(inputs)
        self.alike = [(i, _layout(inputs[i])) for i in sorted(fresh)]
        # Inputs that another object laid out the same way may take the place of (`_rebind`): by their place
        # among the checked ones, with their layout; and what the objects holding them must be (`kinds`).
        self.rebind = {k: _layout(inputs[i]) for k, i in enumerate(same) if i in rebindable}
        self.kinds = kinds
        self.kind = None if kinds is None or local is None else kinds(local)

    @classmethod
    def check(cls, graph: Graph, inputs: Sequence[Any], outputs: Any, result: Any, local: dict[str, Any],
              fresh_locals: set[str], box_ints: bool = False, rebind_locals: set[str] = frozenset(),
              kinds: Kinds | None = None) -> GraphReplay | None:
        """A replay of the guarded call that just passed `inputs` to `graph` and returned `result`, if
        `graph`'s sources gather those very inputs from `local` and its one output is `result`.

        Tensors reached from `rebind_locals` (a decode step's caches) may later be other tensors of the same
        layout, held by objects whose `kinds(local)` is this call's: see `_rebind`."""
        whole = isinstance(outputs, tuple | list) and len(outputs) == 1 and outputs[0] is result
        if graph.names is None or not whole:
            return None
        try:
            gather = gatherer(graph.names, local, made=graph.made)
            values = None if gather is None else gather(local)
        except Exception:  # noqa: BLE001 - a source that does not evaluate here: no replay
            return None
        if values is None or len(values) != len(inputs):
            return None
        if not all(v is x or (not isinstance(x, torch.Tensor) and v == x) for v, x in zip(values, inputs, strict=True)):
            return None
        whole_locals = {f"L[{n!r}]" for n in fresh_locals}
        bases = tuple(f"L[{n!r}]" for n in rebind_locals)
        tensors = [(i, name) for i, (name, x) in enumerate(zip(graph.names, inputs, strict=True))
                   if isinstance(x, torch.Tensor)]
        fresh = {i for i, name in tensors if name in whole_locals}
        rebindable = {i for i, name in tensors if bases and name.startswith(bases)}
        return cls(graph, gather, inputs, fresh, box_ints, rebindable, kinds, local)

    def __call__(self, local: dict[str, Any]) -> Any:
        """The step's result, or None where an input is not the checked one (the caller then guards)."""
        values = self.gather(local)
        same = all(map(operator.is_, self.same(values), [ref() for ref in self.refs]))
        if not same and not self._rebind(values, local):
            return None
        if self.equal(values) != self.values or _modes() != self.modes:
            return None
        if any(_layout(values[i]) != layout for i, layout in self.alike):
            return None
        values = list(values)  # the direct callable takes (and empties) a list
        for i, boxed in self.boxed:
            values[i] = boxed
        if self.direct is not None:
            return self.direct(values)[0]
        return self.fn(*values)[0]

    def _rebind(self, values: tuple, local: dict[str, Any]) -> bool:
        """Whether every checked input that changed is a rebindable one (a new generation's caches) laid out
        as the checked one, held by objects of the checked kinds; if so those become the checked inputs.
        A guarded call would find what dynamo's guards on them check (types, layouts, the caches' chunk
        sizes) unchanged and run the very graph; this is that finding without dynamo's guard evaluation and
        a new check (measured on the small benchmark model, 4 bits, 2-core x86 CPU: the first decode step
        of a generation 3.3 -> 1.7-1.9 ms, a step 1.3)."""
        if self.kinds is None or not self.rebind or self.kinds(local) != self.kind:
            return False
        refs = list(self.refs)
        for k, value in enumerate(self.same(values)):
            if value is refs[k]():
                continue
            layout = self.rebind.get(k)
            if layout is None or _layout(value) != layout:
                return False
            refs[k] = weakref.ref(value)
        self.refs = refs
        return True
