"""Generation in layers: `generate_step` (token ids) -> `stream_generate` (responses) -> `generate` (text)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from common.datatypes import GenerationResponse, MaskedEmbedding, TransformerInput
from common.generation import check_prompt, process_peak_memory_gb, stream_responses
from common.image_prompt import PromptImages, prepare_prompt
from common.penalties import PenaltyBatch, PenaltyTracker, uses_penalties
from common.sampling import RowRandom, SamplingBatch, SamplingParams, agreed
from common.tokenizer import Tokenizer
from common.vision_checkpoint import no_vision
from torch_backend.graphs import DecodeRunner
from torch_backend.model import Transformer
from torch_backend.sample import sample_rows


def _image_table(model: Transformer, images: PromptImages | None, prompt_len: int) -> torch.Tensor | None:
    """Every image feature row [T*P, O], then a zero row that text positions point at."""
    if images is None:
        return None
    if model.args.vision_args is None:
        raise ValueError("images given, but this model has no vision encoder")
    if images.n_rows and int(images.positions.max()) >= prompt_len:
        raise ValueError(f"image positions reach {int(images.positions.max())}, past the prompt of {prompt_len}")
    feats = model.vision_embeddings(torch.from_numpy(images.pixels))  # [T, P, O]
    feats = feats.reshape(-1, feats.shape[-1])  # [T, P, O] -> [T*P, O]
    return torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # [T*P + 1, O]


def _image_rows(table: torch.Tensor | None, images: PromptImages | None, start: int,
                length: int) -> MaskedEmbedding | None:
    """The image features of prompt positions start .. start+length-1, if any of them is a patch."""
    if table is None or images is None:
        return None
    rows = images.rows(start, length)  # [length]
    mask = rows < images.n_rows
    if not mask.any():
        return None
    embedding = table[torch.from_numpy(rows).to(table.device)][None]  # [1, length, O]
    return MaskedEmbedding(embedding=embedding, mask=torch.from_numpy(mask).to(table.device)[None, :, None])


def generate_step(model: Transformer, prompt: Sequence[int], sampling: SamplingParams | None = None,
                  cache: list | None = None, prefill_step_size: int = 512,
                  images: PromptImages | None = None) -> Iterator[int]:
    """Token ids after `prompt`, one model call per token after a prefill in steps; runs until the
    context is full (the caller stops it). A given `cache` continues from its offset. `images`
    (positions relative to `prompt`) fill the prompt's `<|patch|>` rows with image features."""
    sampling = agreed(model, sampling or SamplingParams())
    cache = model.make_cache(1) if cache is None else cache
    position = cache[0].offset
    check_prompt(prompt, model.args.max_seq_len, position)
    device = next(model.parameters()).device
    rows, rand = SamplingBatch.of([sampling]), RowRandom(sampling.seed)
    history = PenaltyTracker(sampling, prompt) if uses_penalties(sampling) else None
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, L]
    with torch.inference_mode():
        table = _image_table(model, images, ids.shape[1])
        for start in range(0, ids.shape[1], prefill_step_size):
            chunk = ids[:, start:start + prefill_step_size]
            image = _image_rows(table, images, start, chunk.shape[1])
            inp = TransformerInput(tokens=chunk, tokens_position=position, image_embedding=image)
            logits = model(inp, cache=cache, last_only=True).logits  # [1, 1, V]: a prefill needs no more
            position += chunk.shape[1]
        token = sample_rows(logits[:, -1], rows, np.array([rand.next()]), PenaltyBatch.of([history]))
    # On CUDA the decode step replays a CUDA graph (captured over this cache on first use); on the CPU
    # it runs compiled where the model asks for it (`load(compile_decode=True)`).
    runner = DecodeRunner.for_model(model)
    # Greedy without repetition controls on the CPU: the pick is numpy's argmax of the logits, read in
    # place, and the next step's token goes into one reused tensor. Between two steps the interpreter
    # runs cold (a step streams the weights through the CPU caches), so each call saved counts:
    # measured on the small benchmark model, 4-bit, 2-core x86 CPU: the loop's own cost per token
    # went from about 63 to 28 us (a step is about 1.25 ms).
    plain = rows.all_greedy and history is None and device.type == "cpu"
    with torch.inference_mode():
        step_token = torch.zeros(1, dtype=torch.long)  # an inference tensor, as the step's checks expect
    slot = step_token.numpy()
    taken = int(token.item())
    while True:
        if history is not None:
            history.add(taken)
        yield taken
        if position >= model.args.max_seq_len:
            return
        with torch.inference_mode():
            if plain:
                slot[0] = taken
                token = step_token
            if runner is not None:
                logits = runner(cache, 1, token.view(1), np.array([position]))  # [1, V]
                for c in cache:
                    c.advance_together(position + 1)
            else:
                inp = TransformerInput(tokens=token.view(1, 1), tokens_position=position)
                logits = model(inp, cache=cache).logits[:, -1]  # [1, V]
            if plain and logits.dtype == torch.float32:
                taken = int(np.argmax(logits.numpy()[0]))  # ties (and NaNs) to the first, as `greedy_ids`
            else:
                token = sample_rows(logits, rows, np.array([rand.next()]), PenaltyBatch.of([history]))
                taken = int(token.item())
        position += 1


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 30)
    return process_peak_memory_gb()


def stream_generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
                    sampling: SamplingParams | None = None, cache: list | None = None,
                    prefill_step_size: int = 512, images: Sequence[Any] | None = None) -> Iterator[GenerationResponse]:
    """Responses with the new text and statistics, until a stop token, `max_tokens` or the context end.

    `images` (files or PIL images; tiles with a prompt of ids) go before the text of a text prompt;
    a prompt of ids must already hold their tokens (see `common.image_prompt.prepare_prompt`).
    """
    ids, prompt_images = prepare_prompt(tokenizer, prompt, images, model.args.vision_args,
                                        no_vision=no_vision(model.args))
    cache = model.make_cache(1) if cache is None else cache
    room = model.args.max_seq_len - cache[0].offset - len(ids)
    device = next(model.parameters()).device
    steps = generate_step(model, ids, sampling, cache, prefill_step_size, prompt_images)
    yield from stream_responses(steps, tokenizer, len(ids), max_tokens, room, lambda: _peak_memory_gb(device))


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 256,
             sampling: SamplingParams | None = None, images: Sequence[Any] | None = None) -> str:
    """The generated text as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, sampling, images=images))
