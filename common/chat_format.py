"""Llama 4 chat format: messages -> prompt token ids, exactly as Meta's reference lays them out.

    <|begin_of_text|>
    per message: <|header_start|> role <|header_end|> "\\n\\n" content <|eot|> (or <|eom|>)
    finally:     <|header_start|> assistant <|header_end|> "\\n\\n"   (open for the model to complete)

Role "tool" is written as "ipython". A message ends with <|eom|> when it is a tool result, or an
assistant message with stop_reason "end_of_message"; otherwise with <|eot|>.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
STOP_REASONS = ("end_of_turn", "end_of_message")
REQUIRED_SPECIALS = ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>")
_KEYS = {"role", "content", "stop_reason", "context"}

Message = Mapping[str, Any]


class ChatFormat:
    """Encodes dialogs for any tokenizer that defines the Llama 4 header and end-of-turn tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        specials = tokenizer.special_tokens
        missing = [t for t in REQUIRED_SPECIALS if t not in specials]
        if missing:
            raise ValueError(
                f"tokenizer lacks the Llama 4 chat special tokens {missing}; "
                "use plain completion (encode_completion) with this tokenizer"
            )
        self.tokenizer = tokenizer
        self._header_start = specials["<|header_start|>"]
        self._header_end = specials["<|header_end|>"]
        self._eot = specials["<|eot|>"]
        self._eom = specials["<|eom|>"]
        # The reference starts every prompt with <|begin_of_text|>; other tokenizers use their bos.
        self._bos = specials.get("<|begin_of_text|>", tokenizer.bos_id)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _begin(self) -> list[int]:
        return [self._bos] if self._bos is not None else []

    def encode_header(self, role: str) -> list[int]:
        """<|header_start|> role <|header_end|> "\\n\\n" (role "tool" is written "ipython")."""
        name = "ipython" if role == "tool" else role
        return [self._header_start, *self._text(name), self._header_end, *self._text("\n\n")]

    def encode_message(self, message: Message) -> list[int]:
        """Header, content (plus "\\n\\n" + context for a user message with `context`), end token."""
        role, content, stop_reason, context = _validate(message)
        tokens = self.encode_header(role) + self._text(content)
        if role == "user" and context is not None:
            tokens += self._text("\n\n") + self._text(context)
        eom = role == "tool" or (role == "assistant" and stop_reason == "end_of_message")
        tokens.append(self._eom if eom else self._eot)
        return tokens

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """bos, every message, then the open assistant header for the model to continue."""
        tokens = self._begin()
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")

    def encode_completion(self, text: str) -> list[int]:
        """A plain (non-chat) prompt: bos followed by the text."""
        return self._begin() + self._text(text)


def _validate(message: Message) -> tuple[str, str, str | None, str | None]:
    """(role, content, stop_reason, context) of a message dict, or ValueError naming the field."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a chat message must be a dict with 'role' and 'content', got {type(message).__name__}")
    unknown = sorted(set(message) - _KEYS)
    if unknown:
        raise ValueError(f"chat message has unsupported keys {unknown}; expected some of {sorted(_KEYS)}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"chat message 'role' must be one of {ROLES}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"chat message 'content' must be a str, got {type(content).__name__}")
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"chat message 'stop_reason' must be one of {STOP_REASONS}, got {stop_reason!r}")
    context = message.get("context")
    if context is not None and not isinstance(context, str):
        raise ValueError(f"chat message 'context' must be a str, got {type(context).__name__}")
    return role, content, stop_reason, context
