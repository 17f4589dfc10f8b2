"""Where each row of one forward sits: its absolute start and its real length (the rest is right padding).

Both backends read these host-side numbers; a forward whose rows share one start and have no padding
is `uniform` and takes the single-position path, any other forward the per-row path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def host_ints(x: Any, name: str) -> np.ndarray:
    """An int array on the host from an int, a sequence, a numpy array or a backend array."""
    if hasattr(x, "detach"):  # a torch tensor (possibly on a device): one explicit copy to the host
        x = x.detach().cpu()
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class RowSpans:
    """starts [B]: absolute position of tokens[b, 0]; lengths [B]: real tokens of row b (1 .. width);
    width: L, the padded length of the call."""

    starts: np.ndarray
    lengths: np.ndarray
    width: int
    uniform: bool = False  # every row starts at the same position and fills the whole width

    @classmethod
    def make(cls, position: Any, lengths: Any, batch: int, width: int) -> RowSpans:
        """From `TransformerInput.tokens_position` (an int or [B]) and `.lengths` (None or [B])."""
        if isinstance(position, (int, np.integer)) and not isinstance(position, bool):
            if position < 0:
                raise ValueError(f"TransformerInput.tokens_position: must be >= 0, got {position}")
            starts = np.full(batch, int(position), dtype=np.int64)
            if lengths is None:  # the common case, without array checks
                return cls(starts, np.full(batch, width, dtype=np.int64), width, True)
        else:
            starts = host_ints(position, "TransformerInput.tokens_position")
            if starts.shape != (batch,):
                raise ValueError(f"TransformerInput.tokens_position: expected an int or one start per row "
                                 f"[{batch}], got shape {list(starts.shape)}")
        if (starts < 0).any():
            raise ValueError(f"TransformerInput.tokens_position: must be >= 0, got {starts.tolist()}")
        if lengths is None:
            lens = np.full(batch, width, dtype=np.int64)
        else:
            lens = host_ints(lengths, "TransformerInput.lengths")
            if lens.shape != (batch,) or (lens < 1).any() or (lens > width).any():
                raise ValueError(f"TransformerInput.lengths: expected {batch} lengths in [1, {width}], "
                                 f"got {lens.tolist()}")
        return cls(starts, lens, width, bool((starts == starts[0]).all() and (lens == width).all()))

    @property
    def batch(self) -> int:
        return len(self.starts)

    @property
    def start(self) -> int:
        """The shared start of a uniform forward."""
        return int(self.starts[0])

    @property
    def ends(self) -> np.ndarray:
        """One past each row's last real position, [B]."""
        return self.starts + self.lengths

    def positions(self) -> np.ndarray:
        """Absolute position of every slot, padding included, [B, L]."""
        return self.starts[:, None] + np.arange(self.width)[None, :]

    def check_limit(self, limit: int) -> None:
        end = self.start + self.width if self.uniform else int(self.ends.max())
        if end > limit:
            row = int(self.ends.argmax())
            raise ValueError(f"TransformerInput: row {row} starts at {int(self.starts[row])} with "
                             f"{int(self.lengths[row])} tokens, ending at {end}, past max_seq_len {limit}")


def check_input(inputs: Any, cache: list | None, n_layers: int, max_seq_len: int) -> RowSpans:
    """The spans of a `TransformerInput` for a model of `n_layers`, checked against its context and its
    cache (one per layer, each row's offset equal to its start)."""
    tokens = inputs.tokens
    if tokens.ndim != 2:
        raise ValueError(f"TransformerInput.tokens: expected [B, L], got shape {list(tokens.shape)}")
    spans = RowSpans.make(inputs.tokens_position, inputs.lengths, tokens.shape[0], tokens.shape[1])
    spans.check_limit(max_seq_len)
    if cache is not None:
        if len(cache) != n_layers:
            raise ValueError(f"cache: expected one cache per layer ({n_layers}), got {len(cache)}")
        for c in cache:
            c.check_spans(spans)
    return spans
