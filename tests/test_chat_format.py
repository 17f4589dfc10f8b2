"""Llama 4 chat format: exact token sequences built by hand from the documented layout."""

from __future__ import annotations

import pytest
from test_tokenizer import CHAT_SPECIALS, byte_level_json, sp_model_bytes, tiny_ranks, write_tiktoken_file

from common.chat_format import ChatFormat
from common.hf_tokenizer import HFTokenizer
from common.sp_tokenizer import SentencePieceTokenizer
from common.tiktoken_tokenizer import TiktokenTokenizer

R = tiny_ranks()
NB = len(R)  # special ids start here
BOS, HEADER_START, HEADER_END, EOM, EOT = NB, NB + 5, NB + 6, NB + 7, NB + 8


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> ChatFormat:
    path = write_tiktoken_file(tmp_path_factory.mktemp("chat") / "tokenizer.model", R)
    return ChatFormat(TiktokenTokenizer.from_file(path))


def header(role: bytes) -> list[int]:
    return [HEADER_START, R[role], HEADER_END, R[b"\n\n"]]


def test_system_user_dialog(chat: ChatFormat) -> None:
    ids = chat.encode_dialog_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    expected = [BOS, *header(b"system"), R[b"Be"], R[b" brief"], R[b"."], EOT]
    expected += [*header(b"user"), R[b"Hi"], EOT]
    expected += header(b"assistant")
    assert ids == expected
    assert chat.tokenizer.decode(ids) == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )


def test_tool_turn(chat: ChatFormat) -> None:
    messages = [
        {"role": "user", "content": "What weather?"},
        {"role": "assistant", "content": "Hi", "stop_reason": "end_of_message"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "sunny", "stop_reason": "end_of_turn"},
    ]
    expected = [BOS, *header(b"user"), R[b"What"], R[b" weather"], R[b"?"], EOT]
    expected += [*header(b"assistant"), R[b"Hi"], EOM]
    expected += [*header(b"ipython"), R[b"sunny"], EOM]
    expected += [*header(b"assistant"), R[b"sunny"], EOT]
    expected += header(b"assistant")
    assert chat.encode_dialog_prompt(messages) == expected


def test_message_details(chat: ChatFormat) -> None:
    assert chat.encode_message({"role": "assistant", "content": ""}) == [*header(b"assistant"), EOT]
    # special-token text in content is plain text, never the special id
    ids = chat.encode_message({"role": "user", "content": "<|eot|>"})
    assert ids[-1] == EOT and EOT not in ids[:-1]
    with_context = chat.encode_message({"role": "user", "content": "Hi", "context": "sunny"})
    assert with_context == [*header(b"user"), R[b"Hi"], R[b"\n\n"], R[b"sunny"], EOT]
    assert chat.encode_completion("Hello world") == [BOS, R[b"Hello"], R[b" world"]]
    assert chat.encode_dialog_prompt([]) == [BOS, *header(b"assistant")]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "bot", "content": "x"}, "'role'"),
        ({"role": "user", "content": 3}, "'content'"),
        ({"role": "user"}, "'content'"),
        ({"role": "assistant", "content": "x", "stop_reason": "done"}, "'stop_reason'"),
        ({"role": "user", "content": "x", "images": []}, "images"),
        ("hello", "dict"),
    ],
)
def test_bad_messages(chat: ChatFormat, message: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        chat.encode_dialog_prompt([message])  # type: ignore[list-item]


def test_sentencepiece_with_chat_specials() -> None:
    tok = SentencePieceTokenizer(sp_model_bytes())
    chat = ChatFormat(tok)
    sp_ids = tok.special_tokens

    def text(s: str) -> list[int]:
        return tok.encode(s, bos=False)

    ids = chat.encode_dialog_prompt([{"role": "tool", "content": "sunny"}])
    expected = [sp_ids["<|begin_of_text|>"], sp_ids["<|header_start|>"], *text("ipython"), sp_ids["<|header_end|>"]]
    expected += [*text("\n\n"), *text("sunny"), sp_ids["<|eom|>"]]
    expected += [sp_ids["<|header_start|>"], *text("assistant"), sp_ids["<|header_end|>"], *text("\n\n")]
    assert ids == expected


def test_tokenizer_without_chat_specials() -> None:
    tok = HFTokenizer(byte_level_json(CHAT_SPECIALS[:2]))
    with pytest.raises(ValueError, match=r"<\|header_start\|>.*<\|eom\|>.*encode_completion"):
        ChatFormat(tok)
