"""A byte tokenizer for the tiny random models (vocabulary 128): id i is the byte i."""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    bos_id = None
    eos_id = None
    pad_id = None
    vocab_size = 128

    def __init__(self, stop: Sequence[int] = ()) -> None:
        self.stop_tokens = frozenset(stop)
        self.special_tokens: dict[str, int] = {}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return list(text.encode("ascii"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("ascii")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(int(i) for i in ids)
