"""Hugging Face `tokenizer.json` behind the common interface (the `tokenizers` package).

bos/eos/pad come from tokenizer_config.json, special_tokens_map.json or generation_config.json
when present. Per-token bytes are rebuilt from the decoder described in the file (byte-level, or
Metaspace/byte-fallback); other decoders fall back to the library's text decode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from common.tokenizer import TokenizerError, checked_ids, with_bos_eos

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_DEFAULT_BOS = ("<|begin_of_text|>", "<s>", "<bos>")
_DEFAULT_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


@dataclass(frozen=True)
class HFSpecials:
    """Token texts for bos/eos/pad and extra stop ids, as read from the config files."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    stop_ids: tuple[int, ...] = ()


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used by ByteLevel models."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    extra = (b for b in range(256) if b not in set(printable))
    for n, b in enumerate(extra):
        table[chr(256 + n)] = b
    return table


def _decoder_steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _decoder_steps(d)]
    return [decoder]


@dataclass(frozen=True)
class _TokenBytes:
    """How one token's text turns into bytes, read from the `decoder` section."""

    kind: str  # "byte_level", "metaspace" or "unknown"
    replacements: tuple[tuple[str, str], ...] = ()
    byte_fallback: bool = False
    strip_first: int = 0

    @classmethod
    def from_decoder(cls, decoder: dict[str, Any] | None) -> _TokenBytes:
        steps = _decoder_steps(decoder)
        types = [s.get("type") for s in steps]
        if "ByteLevel" in types:
            return cls("byte_level")
        repl, strip, fused = [], 0, False
        for s in steps:
            t = s.get("type")
            if t == "Metaspace":
                repl.append((s.get("replacement", "\u2581"), " "))
                scheme = s.get("prepend_scheme")
                prepends = scheme != "never" if scheme else s.get("add_prefix_space", True)
                strip = 1 if prepends else 0
            elif t == "Replace" and "String" in s.get("pattern", {}):
                repl.append((s["pattern"]["String"], s.get("content", "")))
            elif t == "Strip" and fused and s.get("content") == " " and not s.get("stop", 0):
                strip = int(s.get("start", 0))
            elif t == "Fuse":
                fused = True
            elif t != "ByteFallback":
                return cls("unknown")
        return cls("metaspace", tuple(repl), "ByteFallback" in types, strip)


def _special_text(value: Any) -> str | None:
    """A special token entry of a config: a string, or a dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_hf_specials(folder: Path) -> HFSpecials:
    """bos/eos/pad texts and stop ids from the config files beside tokenizer.json (first wins)."""
    found: dict[str, str | None] = {"bos": None, "eos": None, "pad": None}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _read_json(folder / name)
        for key in found:
            found[key] = found[key] or _special_text(data.get(f"{key}_token"))
    eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids or []
    return HFSpecials(found["bos"], found["eos"], found["pad"], tuple(int(i) for i in eos_ids))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _check_merges(spec: Any, name: str) -> None:
    """A BPE model with a `continuing_subword_prefix` cuts that many bytes off the second piece of every
    merge; the tokenizers library panics (and prints a backtrace) where the piece is shorter or the cut
    falls inside a character."""
    model = spec.get("model") if isinstance(spec, dict) else None
    prefix = model.get("continuing_subword_prefix") if isinstance(model, dict) else None
    if not isinstance(prefix, str) or not prefix or not isinstance(model.get("merges"), list):
        return
    cut = len(prefix.encode())  # the library cuts bytes
    for i, merge in enumerate(model["merges"]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
            continue  # the library's own error names it
        raw = pair[1].encode()
        if len(raw) < cut or (len(raw) > cut and raw[cut] & 0xC0 == 0x80):  # short, or cut inside a character
            raise TokenizerError(f"{name}: model.merges[{i}] {merge!r}: its second piece does not carry the "
                                 f"continuing_subword_prefix {prefix!r}")


class HFTokenizer:
    """A `tokenizer.json`; special tokens are its added tokens marked `special`."""

    def __init__(self, json_text: str, specials: HFSpecials | None = None, name: str = "tokenizer.json"):
        try:
            spec = json.loads(json_text)
            _check_merges(spec, name)
            self._tok = tokenizers.Tokenizer.from_str(json_text)
        except TokenizerError:
            raise
        except Exception as e:  # the Rust library raises a bare Exception on a malformed file
            raise TokenizerError(f"{name}: not a valid tokenizer.json ({e})") from None
        except BaseException as e:  # a panic inside the Rust library arrives as pyo3's PanicException
            if type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(f"{name}: not a valid tokenizer.json (the tokenizers library failed: {e})") from None
        self._tok.encode_special_tokens = True  # special-token text in the input stays plain text
        specials = specials or HFSpecials()
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._resolve(specials.bos, _DEFAULT_BOS, name, "bos_token")
        self.eos_id = self._resolve(specials.eos, _DEFAULT_EOS, name, "eos_token")
        # A pad token named in a config but absent from the vocabulary only disables padding.
        self.pad_id = self._tok.token_to_id(specials.pad) if specials.pad else None
        stops = {self.special_tokens[t] for t in ("<|eot|>", "<|eom|>") if t in self.special_tokens}
        stops |= set(specials.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())
        self.stop_tokens = frozenset(stops)
        self._mode = _TokenBytes.from_decoder(spec.get("decoder"))
        self._byte_map = _gpt2_unicode_to_byte() if self._mode.kind == "byte_level" else {}
        self._cache: dict[int, bytes] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read ({e})") from None
        return cls(text, read_hf_specials(folder), name=str(path))

    def _resolve(self, text: str | None, defaults: tuple[str, ...], name: str, key: str) -> int | None:
        if text is not None:
            i = self._tok.token_to_id(text)
            if i is None:
                raise TokenizerError(f"{name}: {key} {text!r} named by the config is not in the vocabulary")
            return i
        return next((i for t in defaults if (i := self._tok.token_to_id(t)) is not None), None)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids if text else []
        return with_bos_eos(list(ids), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        if self._mode.kind == "unknown":
            return self._tok.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=False)
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Token bytes joined; a Metaspace-style leading space is dropped only at index 0."""
        ids = checked_ids(ids, self.vocab_size)
        if self._mode.kind == "unknown":
            return self.decode(ids).encode("utf-8")
        out = [self._token_bytes(i) for i in ids]
        strip = self._mode.strip_first
        if out and strip and ids[0] not in self._added:
            n = len(out[0]) - len(out[0].lstrip(b" "))
            out[0] = out[0][min(n, strip) :]
        return b"".join(out)

    def _token_bytes(self, i: int) -> bytes:
        if i in self._cache:
            return self._cache[i]
        if i in self._added:
            raw = self._added[i].encode("utf-8")
        else:
            raw = self._plain_token_bytes(self._tok.id_to_token(i) or "")
        self._cache[i] = raw
        return raw

    def _plain_token_bytes(self, token: str) -> bytes:
        if self._mode.kind == "byte_level":
            if all(c in self._byte_map for c in token):
                return bytes(self._byte_map[c] for c in token)
            return token.encode("utf-8")
        if self._mode.byte_fallback and (m := _BYTE_TOKEN.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        for old, new in self._mode.replacements:
            token = token.replace(old, new)
        return token.encode("utf-8")
