"""Incremental text for generation: token ids in, complete UTF-8 text out.

A token can end in the middle of a multi-byte character (byte-level BPE, byte-fallback pieces);
those bytes are held back until the character is complete, so no half character is ever emitted.
"""

from __future__ import annotations

import codecs

from common.tokenizer import Tokenizer


class StreamingDetokenizer:
    """Feed ids with `add_token`, read new text from `last_segment`, call `finalize` at the end.

    The concatenation of all segments equals `tokenizer.decode(all ids)` for tokenizers whose
    bytes for one token depend at most on the token before it (all tokenizers in `common`).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prev_bytes = b""
        self._segment = ""
        self._text: list[str] = []

    def add_token(self, token: int) -> None:
        token = int(token)
        if self.tokens:
            # Decode with the previous token as context, so leading-space rules that apply only
            # at the start of a sequence (SentencePiece) are respected.
            pair = self._tokenizer.decode_bytes([self.tokens[-1], token])
            alone = self._tokenizer.decode_bytes([token])
            new = pair[len(self._prev_bytes) :] if pair.startswith(self._prev_bytes) else alone
            self._prev_bytes = alone
        else:
            new = self._prev_bytes = self._tokenizer.decode_bytes([token])
        self.tokens.append(token)
        self._emit(self._decoder.decode(new))

    def finalize(self) -> None:
        """Flush held-back bytes (an unfinished character becomes U+FFFD)."""
        self._emit(self._decoder.decode(b"", final=True))

    @property
    def last_segment(self) -> str:
        """Text completed since the previous read."""
        segment, self._segment = self._segment, ""
        return segment

    @property
    def text(self) -> str:
        """All text completed so far."""
        return "".join(self._text)

    def _emit(self, text: str) -> None:
        if text:
            self._segment += text
            self._text.append(text)
