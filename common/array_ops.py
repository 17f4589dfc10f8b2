"""The machinery of checkpoint remapping, independent of any one layout.

Array operations that work alike on numpy, torch and MLX arrays (dispatched on the array's library,
so `common` imports neither torch nor mlx), a lazy mapping, and the engine that applies a table of
anchored key rules to a state dict. The layouts themselves live in `checkpoint` and `meta_checkpoint`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # numpy.ndarray | torch.Tensor | mlx.core.array
Thunk = Callable[[], Array]
# (source value, source key, ModelArgs) -> one array per target of the rule
Transform = Callable[[Array, str, Any], tuple[Array, ...]]

_LIBRARIES = ("numpy", "torch", "mlx")


class CheckpointError(ValueError):
    """A state dict that does not fit the expected layout or model config; names the keys at fault."""


def library(x: object) -> str:
    """'numpy', 'torch' or 'mlx' for arrays of those libraries, else the type's top-level module."""
    return type(x).__module__.split(".")[0]


def is_array(x: object) -> bool:
    return library(x) in _LIBRARIES and hasattr(x, "shape") and hasattr(x, "reshape")


def shape_of(x: Array) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def concatenate(xs: Sequence[Array], axis: int) -> Array:
    """Concatenate arrays of one library along `axis`."""
    libs = {library(x) for x in xs}
    if len(libs) != 1:
        raise TypeError(f"cannot concatenate arrays of different libraries: {sorted(libs)}")
    lib = libs.pop()
    if lib == "numpy":
        return np.concatenate(list(xs), axis=axis)
    if lib == "torch":
        import torch

        return torch.cat(list(xs), dim=axis)
    if lib == "mlx":
        import mlx.core as mx

        return mx.concatenate(list(xs), axis=axis)
    raise TypeError(f"not an array library: {lib}")


def contiguous(x: Array) -> Array:
    """x in row-major memory order (writers such as safetensors' numpy API store raw memory)."""
    lib = library(x)
    if lib == "numpy":
        return np.ascontiguousarray(x)
    if lib == "torch":
        return x.contiguous()
    return x  # MLX lays arrays out when it evaluates them


def stack(xs: Sequence[Array]) -> Array:
    """Stack equal-shaped arrays along a new leading axis."""
    return concatenate([x.reshape((1, *shape_of(x))) for x in xs], 0)  # [...] -> [1, ...] -> [n, ...]


def take(x: Array, axis: int, start: int, stop: int) -> Array:
    """x[start:stop] along `axis`, as a view where the library allows."""
    axis = axis % len(x.shape)
    return x[(slice(None),) * axis + (slice(start, stop),)]


def split(x: Array, sizes: Sequence[int], axis: int) -> tuple[Array, ...]:
    """Consecutive slices of the given sizes along `axis` (sizes must add up to the axis length)."""
    starts = np.cumsum([0, *sizes]).tolist()
    return tuple(take(x, axis, a, a + n) for a, n in zip(starts, sizes, strict=False))


class LazyDict(Mapping[str, Array]):
    """A read-only mapping whose values are computed by zero-argument functions on every access.

    Nothing is memoised, so a loader that takes one value at a time from memory-mapped sources never
    holds two copies of the weights. `dict(lazy)` materialises everything.
    """

    def __init__(self, thunks: Mapping[str, Thunk]) -> None:
        self._thunks = dict(thunks)

    def __getitem__(self, key: str) -> Array:
        return self._thunks[key]()

    def __contains__(self, key: object) -> bool:
        return key in self._thunks

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"LazyDict({len(self)} keys)"


@dataclass(frozen=True)
class Rule:
    """One source key pattern and the canonical tensors it becomes."""

    pattern: str  # regex that must match the whole source key
    targets: tuple[str, ...]  # templates filled with the match groups, e.g. "layers.{0}.attention.wq.weight"
    transform: Transform | None = None  # None: the value itself, for one target
    stack_group: int | None = None  # group holding this key's slot in a target stacked from several keys


@dataclass(frozen=True)
class _Source:
    key: str
    transform: Transform | None
    output: int
    slot: int | None


def _match(key: str, rules: Sequence[Rule]) -> tuple[Rule, tuple[str, ...]] | None:
    for rule in rules:
        m = re.fullmatch(rule.pattern, key)
        if m:
            return rule, m.groups()
    return None


def _plan(sd: Mapping[str, Any], rules: Sequence[Rule], passthrough: Collection[str], ignore: str,
          layout: str) -> dict[str, list[_Source]]:
    """Canonical name -> its sources; only keys are read, except the values of unmatched keys."""
    plan: dict[str, list[_Source]] = {}
    unknown = []
    for key in sd:
        if key in passthrough:
            plan.setdefault(key, []).append(_Source(key, None, 0, None))
            continue
        hit = _match(key, rules)
        if hit is None:
            # Values are looked at only here: Meta files hold io.BytesIO extra state beside the tensors.
            if not re.fullmatch(ignore, key) and is_array(sd[key]):
                unknown.append(key)
            continue
        rule, groups = hit
        slot = None if rule.stack_group is None else int(groups[rule.stack_group])
        for j, template in enumerate(rule.targets):
            plan.setdefault(template.format(*groups), []).append(_Source(key, rule.transform, j, slot))
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) match no rule of the {layout} layout: "
                              + ", ".join(unknown))
    for name, sources in plan.items():
        slots = [s.slot for s in sources]
        if None in slots and len(sources) > 1:
            raise CheckpointError(f"{name} is given by several keys: " + ", ".join(s.key for s in sources))
        if None not in slots and sorted(slots) != list(range(len(slots))):
            raise CheckpointError(f"{name}: stacked from {sources[0].key} and others, but the slots found "
                                  f"are {sorted(slots)}, not 0..{len(slots) - 1}")
    return plan


def _value(sd: Mapping[str, Any], source: _Source, args: Any) -> Array:
    x = sd[source.key]
    return x if source.transform is None else source.transform(x, source.key, args)[source.output]


def _thunk(sd: Mapping[str, Any], sources: list[_Source], args: Any) -> Thunk:
    if len(sources) == 1 and sources[0].slot is None:
        return lambda: _value(sd, sources[0], args)
    ordered = sorted(sources, key=lambda s: s.slot)
    return lambda: stack([_value(sd, s, args) for s in ordered])


def remap(sd: Mapping[str, Any], rules: Sequence[Rule], args: Any, *, passthrough: Collection[str],
          ignore: str, layout: str) -> dict[str, Thunk]:
    """Apply a rule table to every key of `sd`: canonical name -> thunk that builds it from `sd`.

    Keys in `passthrough` are kept as they are; keys matching no rule but `ignore` (a regex), and
    values that are not arrays, are left out; any other key raises a CheckpointError listing all.
    Names come out in `passthrough` order where they appear there.
    """
    rank = {name: i for i, name in enumerate(passthrough)}
    plan = _plan(sd, rules, rank, ignore, layout)
    names = sorted(plan, key=lambda n: rank.get(n, len(rank)))
    return {name: _thunk(sd, plan[name], args) for name in names}
