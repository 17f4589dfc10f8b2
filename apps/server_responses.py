"""Generation events -> OpenAI responses and stream chunks, for chat and plain completions."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from apps.server_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from common.datatypes import BatchEvent
from common.tokenizer import Tokenizer


@dataclass
class Choice:
    """What one choice has produced so far."""

    want_logprobs: bool
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    cached: int = 0
    finish: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, e: BatchEvent, tokenizer: Tokenizer) -> TokenLogprob | None:
        """Record an event; its token's log-probability entry when asked for."""
        self.text.append(e.text)
        self.cached = max(self.cached, e.cached_tokens)
        if e.finish_reason is not None:
            self.finish = e.finish_reason
        if e.token is None:
            return None
        self.tokens += 1
        if not self.want_logprobs or e.logprob is None:
            return None
        entry = TokenLogprob(**_token(tokenizer, e.token, e.logprob).model_dump(),
                             top_logprobs=[_token(tokenizer, t, v) for t, v in e.top_logprobs])
        self.logprobs.append(entry)
        return entry


def _token(tokenizer: Tokenizer, token: int, logprob: float) -> TopLogprob:
    raw = tokenizer.decode_bytes([token])
    return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))


class Reply:
    """One request's response in OpenAI's shapes: `kind` "chat" or "completion"; `top` how many
    alternatives each token's log-probabilities list."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, n: int, want_logprobs: bool, top: int) -> None:
        self.kind, self.model, self.prompt_tokens, self.top = kind, model, prompt_tokens, top
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice(want_logprobs) for _ in range(n)]

    def usage(self) -> Usage:
        done = sum(c.tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=max(c.cached for c in self.choices)))

    def _finish(self, c: Choice) -> str | None:
        return None if c.finish is None else ("length" if c.finish == "length" else "stop")

    def response(self) -> ChatCompletion | Completion:
        if self.kind == "chat":
            return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=self.usage(), choices=[
                ChatChoice(index=i, message=AssistantMessage(content="".join(c.text)), finish_reason=self._finish(c),
                           logprobs=ChatLogprobs(content=self._top(c.logprobs)) if c.want_logprobs else None)
                for i, c in enumerate(self.choices)])
        return Completion(id=self.id, created=self.created, model=self.model, usage=self.usage(), choices=[
            CompletionChoice(index=i, text="".join(c.text), finish_reason=self._finish(c),
                             logprobs=self._completion_logprobs(c.logprobs) if c.want_logprobs else None)
            for i, c in enumerate(self.choices)])

    def first_chunk(self, index: int) -> ChatCompletionChunk | None:
        """Chat streams open each choice with the assistant role."""
        if self.kind != "chat":
            return None
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])

    def chunk(self, index: int, e: BatchEvent, entry: TokenLogprob | None) -> ChatCompletionChunk | Completion | None:
        """The stream chunk for one event of choice `index` (None when it carries nothing)."""
        c = self.choices[index]
        finish = self._finish(c) if e.finish_reason is not None else None
        if not e.text and finish is None and entry is None:
            return None
        entries = self._top([entry]) if entry is not None else []
        if self.kind == "chat":
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[ChatChunkChoice(
                index=index, delta=Delta(content=e.text), finish_reason=finish,
                logprobs=ChatLogprobs(content=entries) if entry is not None else None)])
        return Completion(id=self.id, created=self.created, model=self.model, choices=[CompletionChoice(
            index=index, text=e.text, finish_reason=finish,
            logprobs=self._completion_logprobs(entries) if entry is not None else None)])

    def usage_chunk(self) -> ChatCompletionChunk | Completion:
        if self.kind == "chat":
            return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                       usage=self.usage())
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def _top(self, entries: list[TokenLogprob]) -> list[TokenLogprob]:
        """Entries with their alternatives cut to what was asked for (the generator reports at least one)."""
        return [e.model_copy(update={"top_logprobs": e.top_logprobs[: self.top]}) for e in entries]

    def _completion_logprobs(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        out, offset = CompletionLogprobs(), 0
        for e in self._top(entries):
            out.tokens.append(e.token)
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append({t.token: t.logprob for t in e.top_logprobs})
            out.text_offset.append(offset)
            offset += len(e.token)
        return out
