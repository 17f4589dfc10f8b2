"""The tokenizer interface shared by every tokenizer kind, and loading one from a model folder.

Three kinds implement it: the Llama 4 tiktoken `tokenizer.model` (common.tiktoken_tokenizer),
SentencePiece `.model` files (common.sp_tokenizer) and HF `tokenizer.json` (common.hf_tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

# A tiktoken rank file starts with a line `base64(token_bytes) rank`; a SentencePiece model is protobuf.
_TIKTOKEN_FIRST_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?$")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or inconsistent; the message names the file."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the generator, the chat format and the apps rely on.

    `special_tokens` maps each special token's text to its id; `stop_tokens` are the ids that end
    generation. Special-token text inside `encode`'s input is encoded as plain text; `decode` renders
    special ids as their text. `decode_bytes` returns the raw bytes, which may end in the middle
    of a UTF-8 character, so a streaming detokenizer can hold such a tail back.
    """

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    stop_tokens: frozenset[int]
    special_tokens: dict[str, int]
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


def with_bos_eos(ids: list[int], bos_id: int | None, eos_id: int | None, bos: bool, eos: bool) -> list[int]:
    """`ids` with bos prepended and eos appended when asked for and defined by the tokenizer."""
    head = [bos_id] if bos and bos_id is not None else []
    tail = [eos_id] if eos and eos_id is not None else []
    return head + ids + tail


def checked_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """`ids` as Python ints, or ValueError when one is outside [0, vocab_size)."""
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:4]} out of range for a vocabulary of {vocab_size}")
    return out


def is_tiktoken_file(path: Path) -> bool:
    """True when `path` looks like a tiktoken BPE rank file (first line `base64 rank`)."""
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_TIKTOKEN_FIRST_LINE.match(first.rstrip(b"\n")))


def load_tokenizer_files(folder: str | Path) -> Tokenizer:
    """The tokenizer stored in `folder`: `tokenizer.json` if present, else `tokenizer.model`.

    A `tokenizer.model` is read as a Llama 4 tiktoken rank file or as a SentencePiece model,
    decided by its content, not its name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a directory")
    hf_file, model_file = folder / "tokenizer.json", folder / "tokenizer.model"
    if hf_file.is_file():
        from common.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_folder(folder)
    if model_file.is_file():
        if is_tiktoken_file(model_file):
            from common.tiktoken_tokenizer import TiktokenTokenizer

            return TiktokenTokenizer.from_file(model_file)
        from common.sp_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.from_file(model_file)
    raise TokenizerError(
        f"no tokenizer in {folder}: looked for tokenizer.json (Hugging Face) and "
        "tokenizer.model (Llama 4 tiktoken or SentencePiece)"
    )
