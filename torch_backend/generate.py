"""Generation in layers: `generate_step` (token ids) -> `stream_generate` (responses) -> `generate` (text)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from common.datatypes import GenerationResponse, TransformerInput
from common.generation import check_prompt, encode_prompt, process_peak_memory_gb, stream_responses
from common.sampling import SamplingParams
from common.tokenizer import Tokenizer
from torch_backend.model import Transformer


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from float32 logits [B, V]: temperature, then top-k, top-p, min-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)  # [B, V]
        # Drop a token once the mass before it already exceeds p (the reference's rule).
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p > params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs / probs.sum(dim=-1, keepdim=True), 1, generator=generator).squeeze(-1)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def generate_step(model: Transformer, prompt: Sequence[int], sampling: SamplingParams | None = None,
                  cache: list | None = None, prefill_step_size: int = 512) -> Iterator[int]:
    """Token ids after `prompt`, one model call per token after a prefill in steps; runs until the
    context is full (the caller stops it). A given `cache` continues from its offset."""
    sampling = sampling or SamplingParams()
    cache = model.make_cache(1) if cache is None else cache
    position = cache[0].offset
    check_prompt(prompt, model.args.max_seq_len, position)
    device = next(model.parameters()).device
    gen = _generator(sampling, device)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, L]
    with torch.inference_mode():
        for start in range(0, ids.shape[1], prefill_step_size):
            chunk = ids[:, start:start + prefill_step_size]
            logits = model(TransformerInput(tokens=chunk, tokens_position=position), cache=cache).logits
            position += chunk.shape[1]
        token = sample(logits[:, -1], sampling, gen)
    while True:
        yield int(token.item())
        if position >= model.args.max_seq_len:
            return
        with torch.inference_mode():
            inp = TransformerInput(tokens=token.view(1, 1), tokens_position=position)
            token = sample(model(inp, cache=cache).logits[:, -1], sampling, gen)
        position += 1


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 30)
    return process_peak_memory_gb()


def stream_generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, cache: list | None = None,
                    prefill_step_size: int = 512) -> Iterator[GenerationResponse]:
    """Responses with the new text and statistics, until a stop token, `max_tokens` or the context end."""
    ids = encode_prompt(tokenizer, prompt)
    cache = model.make_cache(1) if cache is None else cache
    room = model.args.max_seq_len - cache[0].offset - len(ids)
    device = next(model.parameters()).device
    steps = generate_step(model, ids, sampling, cache, prefill_step_size)
    yield from stream_responses(steps, tokenizer, len(ids), max_tokens, room, lambda: _peak_memory_gb(device))


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
             sampling: SamplingParams | None = None) -> str:
    """The generated text as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, sampling))
