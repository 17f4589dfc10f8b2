"""Tokenizers of every kind, built in the test: Llama 4 tiktoken rank file, SentencePiece, HF tokenizer.json."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from common.detokenizer import StreamingDetokenizer
from common.hf_tokenizer import HFTokenizer
from common.sp_tokenizer import SentencePieceTokenizer
from common.tiktoken_tokenizer import TiktokenTokenizer, split_for_encoding
from common.tokenizer import Tokenizer, TokenizerError, load_tokenizer_files

# Whole words get a token through a chain of prefixes ("He", "Hel", ...), so BPE merges reach them.
WORDS = ["Hello", " world", "hello", " the", "123", "45", "\n\n", "Be", " brief", "Hi", "system", "user",
         "assistant", "ipython", "What", " weather", "?", "sunny"]  # fmt: skip
CHAT_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>"]
EMOJI = ["😀", "👍🏽", "家", "é", "ß", "\u0301", "🇺🇳", "\n", " ", "\t", "<|eot|>"]
TEXT = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from(EMOJI)), max_size=40).map("".join)


def tiny_ranks() -> dict[bytes, int]:
    """The 256 single bytes (rank = byte value) followed by prefix chains of WORDS."""
    ranks = {bytes([b]): b for b in range(256)}
    for word in WORDS:
        raw = word.encode()
        for end in range(2, len(raw) + 1):
            ranks.setdefault(raw[:end], len(ranks))
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def corpus() -> list[str]:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "model", "llama"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    return lines + ["Grüße aus Köln, naïve café: 日本語のテキスト 😀."] * 10


def sp_model_bytes() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, user_defined_symbols=CHAT_SPECIALS[2:] + ["<|begin_of_text|>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


def byte_level_json(specials: list[str]) -> str:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def metaspace_json() -> str:
    """Llama-2 style: Metaspace pieces, byte-fallback tokens <0xNN>, decoder Replace/ByteFallback/Fuse/Strip."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(byte_fallback=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first")
    d = tokenizers.decoders
    tok.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return json.dumps(spec)


@pytest.fixture(scope="module")
def tik(tmp_path_factory: pytest.TempPathFactory) -> TiktokenTokenizer:
    return TiktokenTokenizer.from_file(write_tiktoken_file(tmp_path_factory.mktemp("tik") / "tok.model", tiny_ranks()))


@pytest.fixture(scope="module")
def sp() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_model_bytes())


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    return HFTokenizer(byte_level_json(CHAT_SPECIALS))


@pytest.fixture(scope="module")
def hf_meta() -> HFTokenizer:
    return HFTokenizer(metaspace_json())


# ---------------------------------------------------------------- tiktoken


def test_tiktoken_special_ids(tik: TiktokenTokenizer) -> None:
    nb = len(tiny_ranks())
    assert tik.num_base_tokens == nb and tik.vocab_size == nb + 2048
    assert (tik.bos_id, tik.eos_id, tik.pad_id) == (nb, nb + 1, nb + 18)
    assert tik.stop_tokens == {nb + 1, nb + 7, nb + 8}
    sp_ids = tik.special_tokens
    assert (sp_ids["<|header_start|>"], sp_ids["<|header_end|>"], sp_ids["<|eom|>"], sp_ids["<|eot|>"]) == (
        nb + 5, nb + 6, nb + 7, nb + 8,
    )  # fmt: skip
    assert sp_ids["<|image_start|>"] == nb + 80 and sp_ids["<|patch|>"] == nb + 92
    assert sp_ids["<|reasoning_thinking_end|>"] == nb + 1143
    assert sp_ids["<|reserved_special_token_903|>"] == nb + 2047
    assert sorted(sp_ids.values()) == list(range(nb, nb + 2048))


def test_tiktoken_encode_follows_o200k_split(tik: TiktokenTokenizer) -> None:
    r = tiny_ranks()
    ids = tik.encode("Hello, world! 12345")
    # Same pieces as the real file's [200000, 19873, 24, 3817, 13, 220, 7235, 2127].
    assert ids == [tik.bos_id, r[b"Hello"], r[b","], r[b" world"], r[b"!"], r[b" "], r[b"123"], r[b"45"]]
    assert tik.encode("Hello", bos=False, eos=True) == [r[b"Hello"], tik.eos_id]
    assert tik.decode(ids) == "<|begin_of_text|>Hello, world! 12345"


def test_tiktoken_special_text_stays_plain(tik: TiktokenTokenizer) -> None:
    text = "a<|eot|>b<|begin_of_text|>"
    ids = tik.encode(text, bos=False)
    assert all(i < tik.num_base_tokens for i in ids)
    assert len(ids) == len(text.encode())  # no merges for these bytes in the tiny file
    assert tik.decode(ids) == text
    assert tik.decode([tik.special_tokens["<|eot|>"]]) == "<|eot|>"


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_tiktoken_round_trip(tik: TiktokenTokenizer, text: str) -> None:
    assert tik.decode(tik.encode(text, bos=False)) == text


def test_split_for_encoding_matches_reference_cuts() -> None:
    text = "a" * 60_001 + " " * 30_000 + "b"
    pieces = list(split_for_encoding(text))
    assert [len(p) for p in pieces] == [25_000, 25_000, 35_001, 5_001]
    assert "".join(pieces) == text
    long = "ab " * 133_335  # 400_005 chars, short runs: only the 400k cut applies
    assert [len(p) for p in split_for_encoding(long)] == [400_000, 5]
    assert list(split_for_encoding("")) == []


def test_tiktoken_long_input_round_trip(tik: TiktokenTokenizer) -> None:
    text = "a" * 60_001 + " " * 30_000 + "Hello"
    assert tik.decode(tik.encode(text, bos=False)) == text


def test_tiktoken_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_text("QQ== 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError, match=r"bad\.model: line 2"):
        TiktokenTokenizer.from_file(bad)
    ranks = {bytes([b]): b for b in range(200)}
    with pytest.raises(TokenizerError, match="missing"):
        TiktokenTokenizer.from_file(write_tiktoken_file(tmp_path / "few.model", ranks))
    gap = {bytes([b]): b for b in range(256)} | {b"ab": 300}
    with pytest.raises(TokenizerError, match="exactly 0..256"):
        TiktokenTokenizer.from_file(write_tiktoken_file(tmp_path / "gap.model", gap))


# ---------------------------------------------------------------- SentencePiece


def test_sp_specials(sp: SentencePieceTokenizer) -> None:
    proc = spm.SentencePieceProcessor(model_proto=sp_model_bytes())
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (proc.bos_id(), proc.eos_id(), None)
    assert sp.vocab_size == proc.get_piece_size()
    for name in ["<s>", "</s>", *CHAT_SPECIALS[2:]]:
        assert sp.special_tokens[name] == proc.piece_to_id(name)
    assert sp.stop_tokens == {proc.eos_id(), proc.piece_to_id("<|eot|>"), proc.piece_to_id("<|eom|>")}
    assert sp.encode("", bos=True, eos=True) == [sp.bos_id, sp.eos_id]


def test_sp_special_text_stays_plain(sp: SentencePieceTokenizer) -> None:
    text = "hi <|eot|> there<|header_start|>"
    ids = sp.encode(text, bos=False)
    assert not set(ids) & set(sp.special_tokens.values())
    assert sp.decode(ids) == text
    assert sp.decode([sp.special_tokens["<|eot|>"]]) == "<|eot|>"


def test_sp_decode_matches_sentencepiece(sp: SentencePieceTokenizer) -> None:
    proc = spm.SentencePieceProcessor(model_proto=sp_model_bytes())
    for text in ["Hello world", " two  spaces ", "Grüße 😀\n\tx", "the quick brown fox"]:
        ids = proc.encode(text)
        assert sp.encode(text, bos=False) == ids
        assert sp.decode(ids) == proc.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_sp_round_trip(sp: SentencePieceTokenizer, text: str) -> None:
    text = text.replace("\u2581", "_")  # SentencePiece's own space marker cannot round-trip
    assert sp.decode(sp.encode(text, bos=False)) == text


def test_sp_corrupt_model(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\xff\xff\xff\x0f garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model.*not a valid SentencePiece"):
        load_tokenizer_files(tmp_path)


# ---------------------------------------------------------------- HF tokenizer.json


def test_hf_specials_from_configs(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(byte_level_json(CHAT_SPECIALS))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot|>"}, "pad_token": "<|end_of_text|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    tok = load_tokenizer_files(tmp_path)
    assert isinstance(tok, HFTokenizer)
    ids = {t: i for i, t in enumerate(CHAT_SPECIALS)}  # trainer puts special tokens first
    assert tok.special_tokens == ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, ids["<|eot|>"], 1)
    assert tok.stop_tokens == {1, ids["<|eom|>"], ids["<|eot|>"]}


def test_hf_defaults_and_plain_special_text(hf: HFTokenizer) -> None:
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, None)
    text = "x<|eot|> <|begin_of_text|>"
    ids = hf.encode(text, bos=False)
    assert not set(ids) & set(hf.special_tokens.values())
    assert hf.encode(text) == [0, *ids]
    assert hf.decode(ids) == text and hf.decode([5, 2]) == "<|eot|><|header_start|>"


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_hf_round_trip(hf: HFTokenizer, text: str) -> None:
    ids = hf.encode(text, bos=False)
    assert hf.decode(ids) == text
    assert hf.decode(ids) == hf._tok.decode(ids, skip_special_tokens=False)


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_hf_metaspace_decode_matches_library(hf_meta: HFTokenizer, text: str) -> None:
    ids = hf_meta.encode(text, bos=False)
    assert hf_meta.decode(ids) == hf_meta._tok.decode(ids, skip_special_tokens=False)
    assert hf_meta.decode([hf_meta.bos_id, *ids]) == hf_meta._tok.decode([hf_meta.bos_id, *ids], False)


def test_hf_corrupt_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match="tokenizer.json.*not a valid tokenizer.json"):
        load_tokenizer_files(tmp_path)


@pytest.mark.parametrize("prefix", ["x" * 50, "\u00e9"])
def test_hf_merges_shorter_than_the_subword_prefix(tmp_path: Path, prefix: str) -> None:
    """The tokenizers library panics on these (found by the fuzz test); here they are a one-line error.
    "\u00e9" is two bytes: the library would cut the merge's one-byte piece inside a character."""
    spec = json.loads(byte_level_json(CHAT_SPECIALS))
    spec["model"]["continuing_subword_prefix"] = prefix
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"model.merges\[0\].*continuing_subword_prefix"):
        load_tokenizer_files(tmp_path)


def test_hf_library_panic_is_a_tokenizer_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A panic in the Rust library arrives as pyo3's PanicException, a BaseException: it becomes a
    TokenizerError, while an interrupt still passes through."""
    panic = type("PanicException", (BaseException,), {})

    def raise_(error: BaseException):
        def from_str(text: str):
            raise error
        return from_str

    text = byte_level_json(CHAT_SPECIALS)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", raise_(panic("index out of range")))
    with pytest.raises(TokenizerError, match="tokenizers library failed: index out of range"):
        HFTokenizer(text)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", raise_(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        HFTokenizer(text)


# ---------------------------------------------------------------- loading


def test_load_detects_kind_by_content(tmp_path: Path) -> None:
    write_tiktoken_file(tmp_path / "tokenizer.model", tiny_ranks())
    assert isinstance(load_tokenizer_files(str(tmp_path)), TiktokenTokenizer)
    (tmp_path / "tokenizer.model").write_bytes(sp_model_bytes())
    assert isinstance(load_tokenizer_files(tmp_path), SentencePieceTokenizer)
    (tmp_path / "tokenizer.json").write_text(byte_level_json(CHAT_SPECIALS))
    tok = load_tokenizer_files(tmp_path)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)


def test_load_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer in .*tokenizer\.json.*tokenizer\.model"):
        load_tokenizer_files(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer_files(tmp_path / "nope")


# ---------------------------------------------------------------- streaming detokenizer


def test_streaming_holds_back_split_characters(tik: TiktokenTokenizer) -> None:
    ids = tik.encode("😀é", bos=False)
    assert len(ids) == 6  # 4 + 2 single-byte tokens
    detok = StreamingDetokenizer(tik)
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    assert segments == ["", "", "", "😀", "", "é"]
    detok.finalize()
    assert detok.last_segment == "" and detok.text == "😀é"


def test_streaming_finalize_flushes_broken_tail(tik: TiktokenTokenizer) -> None:
    detok = StreamingDetokenizer(tik)
    for i in tik.encode("a😀", bos=False)[:3]:
        detok.add_token(i)
    assert detok.last_segment == "a"
    detok.finalize()
    assert detok.last_segment == "\ufffd"


@pytest.mark.parametrize("kind", ["tik", "sp", "hf", "hf_meta"])
def test_streaming_equals_decode(kind: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(kind)

    @settings(max_examples=60, deadline=None)
    @given(text=TEXT)
    def check(text: str) -> None:
        ids = tok.encode(text, bos=False)
        detok = StreamingDetokenizer(tok)
        segments = []
        for i in ids:
            detok.add_token(i)
            segments.append(detok.last_segment)
        detok.finalize()
        segments.append(detok.last_segment)
        assert "".join(segments) == tok.decode(ids)
        assert all("\ufffd" not in s for s in segments) or "\ufffd" in text

    check()


@pytest.mark.parametrize("kind", ["tik", "sp", "hf", "hf_meta"])
def test_streaming_multibyte_split_across_tokens(kind: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(kind)
    ids = tok.encode("🙂", bos=False)  # not in any training text: byte-level / byte-fallback pieces
    assert len(ids) >= 2
    detok = StreamingDetokenizer(tok)
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    assert [s for s in segments if s] == ["🙂"] and segments[-1] == "🙂"


@pytest.mark.parametrize("kind", ["tik", "sp", "hf", "hf_meta"])
def test_decode_rejects_out_of_range_ids(kind: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(kind)
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([0, bad])
