"""Typed, bounded reads of config-file fields: a wrong type, a non-finite or out-of-range number is a
ValueError naming the field, before any value sizes a loop or an allocation."""

from __future__ import annotations

import math
from typing import Any

REQUIRED = object()
SIZE_LIMIT = 1 << 24  # widths, heads, experts, layers: far above any Llama 4 (dim 5120, 48 layers, 128 experts)
LAYER_LIMIT = 1 << 14
VOCAB_LIMIT = 1 << 27
CONTEXT_LIMIT = 1 << 40


class Fields:
    """The fields of one config object; `where` prefixes error messages ("text_config", "vision_args")."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"invalid model config: '{where}' must be an object, got {type(value).__name__}")
        self.d, self.where = value, where

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _raw(self, key: str, default: Any) -> Any:
        value = self.d.get(key)
        if value is None:
            if default is REQUIRED:
                raise ValueError(f"invalid model config: field '{self._name(key)}': missing")
            return default
        return value

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def int(self, key: str, default: Any = REQUIRED, lo: int = 1, hi: int = SIZE_LIMIT) -> int:
        value = self._raw(key, default)
        return as_int(value, self._name(key), lo, hi) if value is not default or default is REQUIRED else value

    def float(self, key: str, default: Any = REQUIRED, lo: float | None = None, hi: float | None = None) -> float:
        value = self._raw(key, default)
        return as_float(value, self._name(key), lo, hi) if value is not default or default is REQUIRED else value

    def bool(self, key: str, default: bool) -> bool:
        value = self._raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value != 0  # the released configs write attn_temperature_tuning as the int 4
        raise ValueError(f"invalid model config: field '{self._name(key)}': expected true or false, got {value!r}")

    def sub(self, key: str) -> Fields | None:
        value = self.d.get(key)
        return None if value is None or value == {} else Fields(value, self._name(key))

    def int_list(self, key: str, lo: int, hi: int, max_len: int = SIZE_LIMIT) -> list[int] | None:
        value = self.d.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_len:
            raise ValueError(f"invalid model config: field '{self._name(key)}': expected a list of at most "
                             f"{max_len} integers, got {str(value)[:60]}")
        return [as_int(v, f"{self._name(key)}[{i}]", lo, hi) for i, v in enumerate(value)]


def as_int(value: Any, name: str, lo: int = 1, hi: int = SIZE_LIMIT) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"invalid model config: field '{name}': expected an integer, got {value!r:.60}")
    if not lo <= value <= hi:
        raise ValueError(f"invalid model config: field '{name}': must be in [{lo}, {hi}], got {value}")
    return value


def as_float(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid model config: field '{name}': expected a finite number, got {value!r:.60}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"invalid model config: field '{name}': must be in [{lo}, {hi}], got {value}")
    return float(value)
