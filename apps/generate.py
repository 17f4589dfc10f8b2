"""Generate text with a Llama 4 model: `python -m apps.generate --prompt "..."` or `--chat`;
`--image PATH` (repeatable) puts images before the prompt (in the first user message with --chat).

Text streams to stdout; statistics go to stderr. Exit codes: 0 ok, 2 usage, 1 any other error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from apps.cli import add_model_args, report_errors

DEFAULT_PROMPT = "def fibonacci(n):"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.generate", description="Generate text with a Llama 4 model.")
    add_model_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--system", help="system message (chat format only)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file for a vision model, placed before the prompt text (repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--compile", action="store_true",
                   help="torch on the CPU: decode through torch.compile (compiled while loading: ~25 s, ~4 s cached)")
    # Unset sampling flags take the model folder's generation_config.json values, else these defaults.
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=None, help="default: 1 (off)")
    p.add_argument("--top-k", type=int, default=None, help="default: 0 (off)")
    p.add_argument("--min-p", type=float, default=None, help="default: 0 (off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: 1 (off)")
    p.add_argument("--frequency-penalty", type=float, default=None, help="default: 0 (off)")
    p.add_argument("--presence-penalty", type=float, default=None, help="default: 0 (off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="plain completion, no chat format")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    return p


def _chat_format(tokenizer, disabled: bool, vision_args=None):
    """The Llama 4 chat format when the tokenizer has its header tokens (instruct models)."""
    from common.chat_format import ChatFormat

    if disabled or "<|header_start|>" not in tokenizer.special_tokens:
        return None
    return ChatFormat(tokenizer, vision_args)


def _turn_tokens(runner, fmt, text: str, system: str | None, last=None, images=()) -> tuple[list[int], list]:
    """Tokens that open the next turn, and the tiles of its images. The previous turn's last sampled
    token never reached the cache, so it leads, followed by an end of turn when generation stopped
    for length."""
    from common.chat_format import encode_image

    tok = runner.tokenizer
    first = last is None
    lead = [] if first else [last.token]
    if fmt is None:
        encoded = [encode_image(path, runner.model.args.vision_args, tok.special_tokens) for path in images]
        head = tok.encode("", bos=True, eos=False) if first else []
        body = tok.encode(text if first else "\n" + text, bos=False, eos=False)
        return lead + head + [i for ids, _ in encoded for i in ids] + body, [t for _, t in encoded]
    if not first and last.finish_reason != "stop":
        lead.append(tok.special_tokens["<|eot|>"])
    messages = [{"role": "system", "content": system}] if system and first else []
    content = [*({"type": "image", "image": path} for path in images), text] if images else text
    ids, tiles = fmt.encode_dialog(messages + [{"role": "user", "content": content}])
    return (ids if first else lead + ids[1:]), tiles  # later turns: no second BOS


def _run_turn(runner, ids: list[int], args: argparse.Namespace, sampling, cache, images=()):
    last = None
    for r in runner.stream(ids, args.max_tokens, sampling, cache, images=list(images) or None):
        print(r.text, end="", flush=True)
        last = r
    print()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | peak memory: "
              f"{last.peak_memory_gb:.2f} GB | backend: {runner.backend}", file=sys.stderr)
    return last


def _read_line(world) -> str:
    """The next chat line ("" at the end of input); in a tensor-parallel run rank 0 reads it for all."""
    line = None
    if world is None or world.rank == 0:
        try:
            line = input("> ")
        except EOFError:
            line = ""
    return line if world is None else world.broadcast(line)


def sampling_from(args: argparse.Namespace):
    """The flags given, else the model folder's generation_config.json, else SamplingParams' defaults."""
    from common.generation_defaults import generation_defaults
    from common.sampling import SamplingParams

    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
    given = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    return SamplingParams(**(generation_defaults(args.model) | given), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from common.hub import resolve_model

    args.model = str(resolve_model(args.model, args.revision))  # a Hub id becomes its cached snapshot
    from apps.backend import load_runner, quiet_unless_first

    sampling = sampling_from(args)
    runner = load_runner(args.model, args.backend, args.device, args.dtype, dequantize=args.dequantize,
                         compile_decode=args.compile)
    quiet_unless_first(runner.world)
    if args.image and runner.model.args.vision_args is None:
        from common.vision_checkpoint import no_vision

        raise ValueError(f"--image needs a model with a vision encoder: {no_vision(runner.model.args)}")
    fmt = _chat_format(runner.tokenizer, args.no_chat_template, runner.model.args.vision_args)
    if not args.chat:
        ids, tiles = _turn_tokens(runner, fmt, args.prompt or DEFAULT_PROMPT, args.system, images=args.image)
        _run_turn(runner, ids, args, sampling, runner.make_cache(), tiles)
    else:
        _chat(runner, fmt, args, sampling)
    if runner.world is not None:
        runner.world.close()  # every rank got here: tear the group down together
    return 0


def _chat(runner: Any, fmt: Any, args: argparse.Namespace, sampling: Any) -> None:
    cache, last, images = runner.make_cache(), None, args.image  # images go with the first message
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        text = _read_line(runner.world)
        if not text.strip():
            return
        ids, tiles = _turn_tokens(runner, fmt, text, args.system, last, images)
        last, images = _run_turn(runner, ids, args, sampling, cache, tiles), ()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: run(args), args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
