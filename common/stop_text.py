"""Stop strings matched on generated text across token boundaries.

Text that could still be the start of a stop string is held back until the next tokens decide; at a
match, the text before the earliest stop string is released and the rest (the stop string itself)
is dropped, as OpenAI's API does.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        bad = [s for s in stops if not isinstance(s, str) or not s]
        if bad:
            raise ValueError(f"stop: every stop string must be a non-empty str, got {bad!r}")
        self.stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """What was held back, at the end of generation."""
        out, self._held = self._held, ""
        return out

    def _partial(self, buf: str) -> int:
        """Length of the longest end of `buf` that begins some stop string."""
        for n in range(min(len(buf), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
