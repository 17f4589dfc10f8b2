"""Synthetic Llama 4 models for the speed benchmarks, written as Hugging Face folders.

Every size follows the layer pattern mlx-lm's Llama 4 hard-codes (NoPE every 4th layer, chunked
attention with QK norm on the others, top-1 routing, MoE layers where i % step == step - 1), so
the same folder loads in this project, in mlx-lm and in transformers. Shapes are Scout's in
miniature: every layer MoE with 16 experts and a shared expert, GQA 4:1.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from common.args import ModelArgs, MoEArgs
from common.array_ops import LazyDict
from common.checkpoint import canonical_to_hf
from common.hf_config import to_hf_text_config
from common.names import canonical_shapes, is_norm

# name -> (dim, layers, heads, kv heads, head dim, vocab, expert hidden, experts, chunk)
SIZES: dict[str, tuple[int, ...]] = {
    "tiny": (64, 4, 4, 2, 16, 512, 96, 4, 32),
    "small": (512, 8, 8, 2, 64, 8192, 768, 16, 256),
    "medium": (1024, 8, 8, 2, 128, 16384, 1536, 16, 512),
    "large": (2048, 8, 16, 4, 128, 32768, 2048, 16, 1024),  # 1.9B, for GPUs
}
SHARD_BYTES = 1 << 30


def synthetic_args(size: str, num_experts: int | None = None, n_layers: int | None = None,
                   moe_step: int = 1, chunk: int | None = None) -> ModelArgs:
    """The `size` model, optionally with another expert count, depth, MoE interleave or chunk size."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {', '.join(SIZES)}, got {size!r}")
    dim, layers, heads, kv, head_dim, vocab, hidden, experts, default_chunk = SIZES[size]
    layers = n_layers or layers
    return ModelArgs(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
        ffn_hidden_dim=2 * hidden, moe_hidden_dim=hidden, norm_eps=1e-5, rope_theta=500000.0,
        attention_chunk_size=chunk or default_chunk, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192.0, attn_scale=0.1,
        moe_args=MoEArgs(num_experts=num_experts or experts, top_k=1, interleave_moe_layer_step=moe_step),
        rope_layers=tuple((i + 1) % 4 != 0 for i in range(layers)),
        moe_layers=tuple(i for i in range(layers) if i % moe_step == moe_step - 1), max_seq_len=8192)


def parameter_count(args: ModelArgs) -> int:
    return sum(int(np.prod(s)) for s in canonical_shapes(args).values())


def _random(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    # Seeded by name, so a tensor does not depend on the order tensors are written in.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if is_norm(name):
        return rng.uniform(0.8, 1.2, size=shape).astype(np.float32)
    scale = 1.0 if name == "tok_embeddings.weight" else shape[-1] ** -0.5
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def random_canonical(args: ModelArgs, seed: int = 0) -> LazyDict:
    """Canonical float32 weights, each drawn when it is read."""
    shapes = canonical_shapes(args)
    return LazyDict({n: (lambda n=n: _random(n, shapes[n], seed)) for n in shapes})


def write_model(folder: str | Path, args: ModelArgs, seed: int = 0) -> Path:
    """A float32 Llama4ForConditionalGeneration folder (the layout all three libraries read),
    in shards of about 1 GB, with a word-level `tokenizer.json` of `t0 .. t{V-1}` and no EOS."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = canonical_to_hf(random_canonical(args, seed), args, conditional=True)
    current: dict[str, np.ndarray] = {}
    files: list[list[str]] = []
    for name in [*hf, None]:  # layer order, so each shard holds whole layers; None flushes the last
        tensor = None if name is None else hf[name]
        size = sum(t.nbytes for t in current.values())
        if name is None or (current and size + tensor.nbytes > SHARD_BYTES):
            files.append(list(current))
            save_file(current, str(folder / f"part-{len(files)}.safetensors"))
            current = {}  # dropped before the next shard is drawn
        if name is not None:
            current[name] = tensor
    weight_map = {}
    for k, names in enumerate(files, start=1):
        file = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        (folder / f"part-{k}.safetensors").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
              "torch_dtype": "float32", "text_config": to_hf_text_config(args)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, args.vocab_size)
    return folder


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level `tokenizer.json` of `t0 .. t{vocab-1}` (no special tokens) and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "t0"}))


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt of `length` token ids below `vocab_size`."""
    return np.random.default_rng(seed).integers(0, vocab_size, length).tolist()
