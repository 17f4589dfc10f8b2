"""Train the bundled demo model: a small Llama 4 (MoE + dense, NoPE layer, chunked attention, QK norm)
on Python's standard-library source, with a SentencePiece tokenizer trained on the same text.

    python -m apps.train_demo --out apps/demo_model            # CPU, about 30 minutes
    python -m apps.train_demo --device cuda --minutes 5 ...    # same recipe on a GPU

Held-out files are chosen by a hash of their path; their tokens are saved with the model so the
held-out loss can be recomputed anywhere (the test suite does, on both backends).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

from common.args import ModelArgs, MoEArgs

SEQ_LEN = 256
EVAL_TOKENS = 1024  # the slice of held-out tokens the tests evaluate (4 windows of SEQ_LEN)
HELDOUT_TOKENS = 65536  # the held-out loss reported in the README


def demo_args(vocab_size: int) -> ModelArgs:
    return ModelArgs(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=2, vocab_size=vocab_size, head_dim=32,
        ffn_hidden_dim=768, moe_hidden_dim=384, norm_eps=1e-5, rope_theta=500000.0,
        attention_chunk_size=64, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192.0, attn_scale=0.1,
        moe_args=MoEArgs(num_experts=4, top_k=1, interleave_moe_layer_step=2),
        rope_layers=(True, True, True, False, True, True), moe_layers=(1, 3, 5), max_seq_len=4096,
    )


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files of this Python's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "__pycache__", "encodings")  # encodings: generated tables, not code
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    held = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 25 == 0]
    return [p for p in files if p not in set(held)], held


def _relative(path: Path) -> str:
    return str(path.relative_to(sysconfig.get_paths()["stdlib"]))


def _read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    def pieces():  # SentencePiece trains on bounded "sentences"; code keeps its newlines inside them
        for t in texts:
            for i in range(0, len(t), 2000):
                yield t[i:i + 2000]

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=pieces(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_by_whitespace=False, allow_whitespace_only_pieces=True,
        split_digits=True, max_sentence_length=4096, user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=200000, shuffle_input_sentence=True,
        minloglevel=2)
    return model.getvalue()


def tokenize(sp_model: bytes, texts: list[str]) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids: list[int] = []
    for t in texts:
        ids += [sp.bos_id(), *sp.encode(t), sp.eos_id()]
    return np.asarray(ids, dtype=np.uint16)  # vocab_size <= 65536, checked by the parser


def prepare(cache: Path, vocab_size: int) -> dict[str, np.ndarray | bytes]:
    """Tokenizer and token streams, computed once and kept in `cache`."""
    if (cache / "tokenizer.model").exists():
        return {"sp": (cache / "tokenizer.model").read_bytes(), "train": np.load(cache / "train.npy"),
                "heldout": np.load(cache / "heldout.npy")}
    train_files, held_files = stdlib_files()
    train_texts = _read(train_files)
    sp = train_tokenizer(train_texts, vocab_size)
    data = {"sp": sp, "train": tokenize(sp, train_texts), "heldout": tokenize(sp, _read(held_files))}
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "tokenizer.model").write_bytes(sp)
    np.save(cache / "train.npy", data["train"])
    np.save(cache / "heldout.npy", data["heldout"])
    (cache / "heldout_files.json").write_text(json.dumps(
        {"python": sys.version.split()[0], "files": [_relative(p) for p in held_files]}, indent=1))
    return data


def heldout_loss(model, tokens: np.ndarray, device: str, max_tokens: int | None = None) -> float:
    """Mean next-token cross-entropy over non-overlapping SEQ_LEN windows (each predicts SEQ_LEN - 1)."""
    import torch

    from common.datatypes import TransformerInput

    n = (len(tokens) if max_tokens is None else min(max_tokens, len(tokens))) // SEQ_LEN
    windows = torch.from_numpy(tokens[: n * SEQ_LEN].astype(np.int64)).view(n, SEQ_LEN)  # [N, L]
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(16):
            batch = batch.to(device)
            logits = model(TransformerInput(tokens=batch[:, :-1])).logits  # [b, L-1, V]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    return total / count


def train(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from torch_backend.model import Transformer

    torch.manual_seed(args.seed)
    data = prepare(Path(args.data_cache), args.vocab_size)
    model_args = demo_args(args.vocab_size)
    model = Transformer(model_args).to(args.device)
    for name, p in model.named_parameters():  # small-init; norms start at 1
        torch.nn.init.ones_(p) if name.endswith("norm.weight") else torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train_ids = torch.from_numpy(data["train"].astype(np.int64))
    gen = torch.Generator().manual_seed(args.seed)
    start, step = time.time(), 0
    best: tuple[float, int, dict | None] = (float("inf"), 0, None)
    budget = args.minutes * 60
    from common.datatypes import TransformerInput

    while time.time() - start < budget and step < args.max_steps:
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[i:i + SEQ_LEN + 1] for i in idx.tolist()]).to(args.device)  # [B, L+1]
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                            enabled=args.device.startswith("cuda")):
            logits = model(TransformerInput(tokens=batch[:, :-1])).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            val = heldout_loss(model, data["heldout"], args.device, max_tokens=16 * SEQ_LEN * 4)
            model.train()
            if val < best[0]:
                best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"step {step} loss {loss.item():.3f} held-out {val:.3f} lr {lr:.2e} "
                  f"{time.time() - start:.0f}s", file=sys.stderr)
    if best[2] is not None:  # keep the weights with the lowest held-out loss seen
        model.load_state_dict(best[2])
    model.eval()
    stats = {"steps": step, "best_step": best[1], "seconds": round(time.time() - start, 1)}
    save(model, model_args, data, Path(args.out), stats, args.device)
    return stats


def save(model, model_args: ModelArgs, data: dict, out: Path, stats: dict, device: str) -> None:
    """HF layout in float16: config.json, model.safetensors, tokenizer.model, held-out tokens and loss."""
    import torch
    from safetensors.numpy import save_file

    from common.checkpoint import canonical_to_hf
    from common.hf_config import to_hf_text_config

    out.mkdir(parents=True, exist_ok=True)
    canonical = {k: v.detach().to(torch.float16).cpu().numpy() for k, v in model.state_dict().items()}
    save_file(dict(canonical_to_hf(canonical, model_args)), str(out / "model.safetensors"))
    config = to_hf_text_config(model_args) | {"torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.model").write_bytes(data["sp"])
    heldout = data["heldout"][:EVAL_TOKENS].astype(np.int32)
    np.save(out / "heldout_tokens.npy", heldout)
    # The recorded losses are those of the saved float16 weights, evaluated in float32 on the CPU.
    model, device = model.to(torch.float16).to(device="cpu", dtype=torch.float32), "cpu"
    stats["heldout_loss"] = round(heldout_loss(model, data["heldout"], device, HELDOUT_TOKENS), 5)
    stats["heldout_tokens"] = min(HELDOUT_TOKENS, len(data["heldout"])) // SEQ_LEN * SEQ_LEN
    stats["heldout_loss_eval_slice"] = heldout_loss(model, heldout, device)
    (out / "eval.json").write_text(json.dumps(stats, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "demo_model"))
    p.add_argument("--data-cache", default=".demo_data", help="folder for the tokenizer and token streams")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, default=28.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out checks")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 256 < args.vocab_size <= 65536:
        parser.error("--vocab-size must be in (256, 65536]")
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
