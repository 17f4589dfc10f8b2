"""A progress bar on stderr for long loads and conversions, silent when disabled or not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, enabled: bool = True, desc: str = "",
             unit: str = "tensor") -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    disable=not sys.stderr.isatty())
