"""The real Llama 4 `tokenizer.model` (shipped in Meta's llama-models wheel): our tokenizer gives the
reference's ids, checked against the documented examples and against Meta's own tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

spec = importlib.util.find_spec("llama_models")
pytestmark = pytest.mark.skipif(spec is None, reason="llama-models (test extra) is not installed")
MODEL = Path(spec.origin).parent / "llama4" / "tokenizer.model" if spec else None


@pytest.fixture(scope="module")
def ours():
    from common.tiktoken_tokenizer import TiktokenTokenizer

    return TiktokenTokenizer.from_file(MODEL)


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer(MODEL)


def test_documented_ids(ours) -> None:
    assert ours.encode("Hello, world! 12345", bos=True, eos=False) == [200000, 19873, 24, 3817, 13, 220, 7235, 2127]
    assert ours.vocab_size == 202048
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (200000, 200001, 200018)
    assert set(ours.stop_tokens) == {200001, 200007, 200008}
    assert ours.special_tokens["<|patch|>"] == 200092
    assert ours.special_tokens["<|reasoning_thinking_end|>"] == 201143


def test_documented_chat_prompt(ours) -> None:
    from common.chat_format import ChatFormat

    ids = ChatFormat(ours).encode_dialog_prompt([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"}])
    assert ids == [200000, 200005, 15651, 200006, 368, 3654, 17867, 26, 200008,
                   200005, 1556, 200006, 368, 25181, 200008, 200005, 140680, 200006, 368]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
       | st.sampled_from(["<|eot|>", "def f(x):\n\treturn x ** 2\n", "naïve café 😀🇫🇷", "  \n\n  x"]))
def test_same_ids_as_meta(ours, meta, text: str) -> None:
    assert ours.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    assert ours.decode(ours.encode(text, bos=False, eos=False)) == text
