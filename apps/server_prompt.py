"""From a validated request to generation jobs: prompt ids (Llama 4 chat format, or plain text for
models without its special tokens), images from base64 `data:` URLs (never from files or the
network), sampling parameters, limits and stop strings. Every problem is a `RequestError`."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from apps.server_protocol import ChatRequest, CommonFields, CompletionRequest, ContentPart, Message
from common.args import VisionArgs
from common.chat_format import ChatFormat, encode_image
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer

MAX_CHOICES = 16
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request the server refuses: OpenAI's error JSON with `status` (400 unless said)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class Job:
    """One choice to generate."""

    prompt: list[int]
    images: list[np.ndarray] | None
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    logprobs: int  # alternatives per token for `BatchGenerator.insert` (0: no log-probabilities)


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # the most a request may ask for (also its default)
    max_seq_len: int
    image_bytes: int
    image_pixels: int


class PromptBuilder:
    """`defaults`: SamplingParams fields for what a request leaves unset (the model folder's
    generation_config.json); beyond those, OpenAI's defaults (temperature 1, top_p 1)."""

    def __init__(self, tokenizer: Tokenizer, vision: VisionArgs | None, limits: Limits,
                 defaults: dict[str, Any] | None = None,
                 no_vision: str = "this model's config has no vision part") -> None:
        self.tokenizer, self.vision, self.limits, self.no_vision = tokenizer, vision, limits, no_vision
        self.defaults = {"temperature": 1.0, "top_p": 1.0} | (defaults or {})
        specials = tokenizer.special_tokens
        self.chat = ChatFormat(tokenizer, vision) if "<|header_start|>" in specials else None

    def chat_jobs(self, req: ChatRequest) -> list[Job]:
        if req.response_format is not None and req.response_format.type != "text":
            raise RequestError(f"response_format type {req.response_format.type!r} is not supported; use 'text'",
                               "response_format")
        if not req.messages:
            raise RequestError("'messages' must hold at least one message", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = req.top_logprobs or 0
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
        prompt, images = self._chat_prompt(req.messages)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return self._jobs(req, prompt, images, limit, max(top, 1) if req.logprobs else 0)

    def completion_jobs(self, req: CompletionRequest) -> list[Job]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestError("one prompt per request: send a string, a list of token ids, or a list of "
                                   "one string", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=True, eos=False)
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
            if bad:
                raise RequestError(f"token ids {bad[:4]} are outside the vocabulary [0, {self.tokenizer.vocab_size})",
                                   "prompt")
        n = req.logprobs
        if n is not None and not 0 <= n <= 5:
            raise RequestError(f"'logprobs' must be in [0, 5], got {n}", "logprobs")
        return self._jobs(req, ids, None, req.max_tokens, 0 if n is None else max(n, 1))

    def _jobs(self, req: CommonFields, prompt: list[int], images: list[np.ndarray] | None, max_tokens: int | None,
              logprobs: int) -> list[Job]:
        if not prompt:
            raise RequestError("the prompt is empty: at least one token is needed", "prompt")
        if len(prompt) >= self.limits.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens, but the model's context is "
                               f"{self.limits.max_seq_len} tokens (one more is needed to generate)",
                               "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
        limit = self.limits.max_tokens
        max_tokens = limit if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise RequestError(f"max_tokens must be in [1, {limit}], got {max_tokens}", "max_tokens")
        if not 1 <= req.n <= MAX_CHOICES:
            raise RequestError(f"'n' must be in [1, {MAX_CHOICES}], got {req.n}", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOPS or any(not s for s in stop):
            raise RequestError(f"'stop' takes up to {MAX_STOPS} non-empty strings", "stop")
        return [Job(prompt, images, max_tokens, _sampling(req, i, self.defaults), stop, logprobs) for i in range(req.n)]

    def _chat_prompt(self, messages: list[Message]) -> tuple[list[int], list[np.ndarray] | None]:
        converted = [{"role": "system" if m.role == "developer" else m.role,
                      "content": [self._part(p) for p in m.content] if isinstance(m.content, list) else m.content or ""}
                     for m in messages]
        try:
            if self.chat is not None:
                ids, tiles = self.chat.encode_dialog(converted)
                return ids, tiles or None
            return self._plain(converted)
        except RequestError:
            raise
        except ValueError as e:
            raise RequestError(str(e), "messages") from e

    def _plain(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[np.ndarray] | None]:
        """No chat format (a base or demo model): the messages' texts joined by blank lines, any images first."""
        texts, tiles, ids = [], [], [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        for m in messages:
            items = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            texts += [x["text"] for x in items if x["type"] == "text"]
            for x in (x for x in items if x["type"] == "image"):
                tokens, t = encode_image(x["image"], self.vision, self.tokenizer.special_tokens)
                ids += tokens
                tiles.append(t)
        return ids + self.tokenizer.encode("\n\n".join(texts), bos=False, eos=False), tiles or None

    def _part(self, part: ContentPart) -> dict[str, Any]:
        if part.type == "text":
            if part.text is None:
                raise RequestError("a 'text' content part needs 'text'", "messages")
            return {"type": "text", "text": part.text}
        if part.image_url is None:
            raise RequestError("an 'image_url' content part needs 'image_url'", "messages")
        image = self._image(part.image_url.url)
        if self.vision is None:
            raise RequestError(f"images need a model with a vision encoder; {self.no_vision}", "messages")
        return {"type": "image", "image": image}

    def _image(self, url: str) -> Image.Image:
        """A base64 `data:` URL as a decoded image, within the byte and pixel limits."""
        head, _, data = url.partition(",")
        if not (head.startswith("data:") and head.endswith(";base64")):
            raise RequestError("image_url must be a base64 data: URL (data:image/png;base64,...); the server "
                               "fetches no URLs and reads no files", "messages")
        if len(data) * 3 // 4 > self.limits.image_bytes:
            raise RequestError(f"an image is larger than {self.limits.image_bytes} bytes", "messages", status=413)
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
                if w * h > self.limits.image_pixels:
                    raise RequestError(f"an image has {w}x{h} pixels, more than the limit of "
                                       f"{self.limits.image_pixels}", "messages", status=413)
                img.load()
                return img.copy()
        except RequestError:
            raise
        except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RequestError(f"an image could not be decoded ({reason})", "messages") from e


def _sampling(req: CommonFields, choice: int, defaults: dict[str, Any]) -> SamplingParams:
    """The request's values, else `defaults`; choice i of a seeded request samples with seed + i."""
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
    given = {f: getattr(req, f) for f in fields if getattr(req, f) is not None}
    try:
        return SamplingParams(**(defaults | given), seed=None if req.seed is None else req.seed + choice)
    except ValueError as e:
        field = str(e).split("'")[1] if "'" in str(e) else None
        raise RequestError(str(e), field) from e
