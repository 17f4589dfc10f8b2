"""Llama 4's tiktoken tokenizer: a `tokenizer.model` BPE rank file plus 2048 named special tokens."""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from common.tokenizer import TokenizerError, checked_ids, with_bos_eos

# OpenAI's o200k pre-tokenizer pattern, which Llama 4 uses unchanged.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 2048
# tiktoken is slow on huge inputs and on very long runs of one character class, so inputs are cut.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def llama4_special_tokens() -> list[str]:
    """The 2048 special tokens in id order (id = number of base ranks + index)."""

    def reserved(kind: str, lo: int, hi: int) -> list[str]:
        return [f"<|{kind}reserved_special_token_{i}|>" for i in range(lo, hi + 1)]

    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += reserved("text_post_train_", 0, 5)
    text += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += reserved("text_post_train_", 8, 68)
    vision = ["<|image_start|>", "<|image_end|>", *reserved("vision_", 0, 1)]
    vision += ["<|tile_x_separator|>", "<|tile_y_separator|>", *reserved("vision_", 2, 5)]
    vision += ["<|image|>", *reserved("vision_", 6, 6), "<|patch|>", *reserved("vision_", 7, 1047)]
    reasoning = reserved("reasoning_", 0, 7) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text + vision + reasoning
    return named + reserved("", 0, NUM_SPECIAL_TOKENS - len(named) - 1)


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token_bytes) rank` lines; ranks must be exactly 0..n-1 and cover all 256 bytes."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            except (ValueError, binascii.Error):
                raise TokenizerError(
                    f"{path}: line {lineno} is not `base64(token_bytes) rank`: {line[:80]!r}"
                ) from None
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be unique and exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: byte-level BPE needs all 256 single bytes; missing {missing[:8]}")
    return ranks


def split_for_encoding(text: str) -> Iterator[str]:
    """Cut `text` into pieces of <= 400k chars, then wherever a run of whitespace or of
    non-whitespace passes 25k chars (cuts at run start + 25k, + 50k, ...), as the reference does."""
    for i in range(0, len(text), MAX_ENCODE_CHARS):
        piece = text[i : i + MAX_ENCODE_CHARS]
        start = pos = 0
        for _, run in itertools.groupby(piece, key=str.isspace):
            length = sum(1 for _ in run)
            for cut in range(pos + MAX_RUN_CHARS, pos + length, MAX_RUN_CHARS):
                yield piece[start:cut]
                start = cut
            pos += length
        if start < len(piece):
            yield piece[start:]


class TiktokenTokenizer:
    """Llama 4 tokenizer: byte-level BPE ranks from the file, then the 2048 special tokens."""

    def __init__(self, ranks: dict[bytes, int], name: str = "tokenizer.model") -> None:
        num_base = len(ranks)
        self.special_tokens: dict[str, int] = {tok: num_base + i for i, tok in enumerate(llama4_special_tokens())}
        self._enc = tiktoken.Encoding(
            name, pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.num_base_tokens = num_base
        self.vocab_size = num_base + NUM_SPECIAL_TOKENS
        self.bos_id: int | None = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int | None = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int | None = self.special_tokens["<|finetune_right_pad|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        self.stop_tokens = frozenset({self.special_tokens["<|end_of_text|>"], self.eom_id, self.eot_id})

    @classmethod
    def from_file(cls, path: str | Path) -> TiktokenTokenizer:
        path = Path(path)
        return cls(load_bpe_ranks(path), name=path.name)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in split_for_encoding(text):
            # disallowed_special=() and no allowed set: special-token text is ordinary text.
            ids.extend(self._enc.encode(piece, allowed_special=set(), disallowed_special=()))
        return with_bos_eos(ids, self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(checked_ids(ids, self.vocab_size))
