"""SentencePiece `.model` tokenizer behind the common interface.

SentencePiece always cuts user-defined pieces out of the input text. To keep special-token text
plain, the encoder is a copy of the model in which those pieces are CONTROL pieces (never matched
in text). Decoding is done here, piece by piece, so raw bytes (also half characters) are available.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from common.tokenizer import TokenizerError, checked_ids, with_bos_eos

# SentencePiece.Type values in sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes, bytes]]:
    """(field number, wire type, value, raw bytes of the whole field) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
            if pos > len(buf):
                raise ValueError("truncated field")
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value, buf[start:pos]


def _piece_info(piece_msg: bytes) -> tuple[str, int]:
    """(piece text, type) of one ModelProto.SentencePiece message (type defaults to NORMAL)."""
    text, kind = "", NORMAL
    for number, _, value, _ in _fields(piece_msg):
        if number == 1:
            text = bytes(value).decode("utf-8")
        elif number == 3:
            kind = int(value)
    return text, kind


def _demote_user_defined(proto: bytes) -> bytes:
    """The model with every USER_DEFINED piece turned into a CONTROL piece (same ids)."""
    out = bytearray()
    for number, _, value, raw in _fields(proto):
        if number == 1 and _piece_info(bytes(value))[1] == USER_DEFINED:
            kept = b"".join(r for n, _, _, r in _fields(bytes(value)) if n != 3)
            sub = kept + bytes([3 << 3, CONTROL])  # field 3 (type), varint CONTROL
            out += bytes([1 << 3 | 2]) + _encode_varint(len(sub)) + sub
        else:
            out += raw
    return bytes(out)


def _parse_model(proto: bytes) -> tuple[list[tuple[str, int]], bool]:
    """(pieces as (text, type), whether decoding drops the first piece's leading space)."""
    pieces: list[tuple[str, int]] = []
    dummy_prefix = extra_ws = True  # NormalizerSpec defaults
    for number, _, value, _ in _fields(proto):
        if number == 1:
            pieces.append(_piece_info(bytes(value)))
        elif number == 3:
            for n, _, v, _ in _fields(bytes(value)):
                if n == 3:
                    dummy_prefix = bool(v)
                elif n == 4:
                    extra_ws = bool(v)
    return pieces, dummy_prefix or extra_ws


class SentencePieceTokenizer:
    """A SentencePiece model; special tokens are its control and user-defined pieces."""

    def __init__(self, proto: bytes, name: str = "tokenizer.model") -> None:
        try:
            pieces, self._strip_first_space = _parse_model(proto)
            self._sp = spm.SentencePieceProcessor(model_proto=_demote_user_defined(proto))
        except (ValueError, RuntimeError, OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{name}: not a valid SentencePiece model ({e})") from None
        if not pieces or len(pieces) != self._sp.get_piece_size():
            raise TokenizerError(f"{name}: not a valid SentencePiece model (no pieces)")
        self.vocab_size = len(pieces)
        self.special_tokens: dict[str, int] = {
            text: i for i, (text, kind) in enumerate(pieces) if kind in (CONTROL, USER_DEFINED)
        }
        self.bos_id = self._optional_id(self._sp.bos_id())
        self.eos_id = self._optional_id(self._sp.eos_id())
        self.pad_id = self._optional_id(self._sp.pad_id())
        stops = {self.special_tokens[t] for t in ("<|eot|>", "<|eom|>") if t in self.special_tokens}
        self.stop_tokens = frozenset(stops | ({self.eos_id} if self.eos_id is not None else set()))
        unk_surface = self._sp.decode([self._sp.unk_id()]).encode("utf-8")
        self._piece_bytes = [self._surface(text, kind, unk_surface) for text, kind in pieces]
        self._kinds = [kind for _, kind in pieces]

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        return cls(path.read_bytes(), name=str(path))

    def _optional_id(self, i: int) -> int | None:
        return i if 0 <= i < self.vocab_size else None

    @staticmethod
    def _surface(text: str, kind: int, unk_surface: bytes) -> bytes:
        if kind == BYTE and (m := _BYTE_PIECE.fullmatch(text)):
            return bytes([int(m.group(1), 16)])
        if kind == UNKNOWN:
            return unk_surface
        if kind in (CONTROL, USER_DEFINED):
            return text.encode("utf-8")
        return text.replace(_SPACE, " ").encode("utf-8")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = list(self._sp.encode(text)) if text else []
        return with_bos_eos(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Piece surfaces joined. Like SentencePiece, the dummy-prefix space of a normal first piece
        is dropped; only at index 0, so a token's bytes never depend on more than its predecessor."""
        ids = checked_ids(ids, self.vocab_size)
        out = [self._piece_bytes[i] for i in ids]
        if out and self._strip_first_space and self._kinds[ids[0]] == NORMAL and out[0][:1] == b" ":
            out[0] = out[0][1:]
        return b"".join(out)
