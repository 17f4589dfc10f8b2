"""Generate text with a Llama 4 model: `python -m apps.generate --prompt "..."` or `--chat`.

Text streams to stdout; statistics go to stderr. Exit codes: 0 ok, 2 usage, 1 any other error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

DEMO_MODEL = str(Path(__file__).parent / "demo_model")
DEFAULT_PROMPT = "def fibonacci(n):"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.generate", description="Generate text with a Llama 4 model.")
    p.add_argument("--model", default=DEMO_MODEL, help="model folder (default: the bundled demo model)")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="torch device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: as stored)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--system", help="system message (chat format only)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="plain completion, no chat format")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    return p


def _chat_format(tokenizer, disabled: bool):
    """The Llama 4 chat format when the tokenizer has its header tokens (instruct models)."""
    from common.chat_format import ChatFormat

    if disabled or "<|header_start|>" not in tokenizer.special_tokens:
        return None
    return ChatFormat(tokenizer)


def _turn_tokens(runner, fmt, text: str, system: str | None, last=None) -> list[int]:
    """Tokens that open the next turn. The previous turn's last sampled token never reached the
    cache, so it leads, followed by an end of turn when generation stopped for length."""
    tok = runner.tokenizer
    first = last is None
    lead = [] if first else [last.token]
    if fmt is None:
        return lead + tok.encode(text if first else "\n" + text, bos=first, eos=False)
    if not first and last.finish_reason != "stop":
        lead.append(tok.special_tokens["<|eot|>"])
    messages = [{"role": "system", "content": system}] if system and first else []
    ids = fmt.encode_dialog_prompt(messages + [{"role": "user", "content": text}])
    return ids if first else lead + ids[1:]  # later turns: no second BOS


def _run_turn(runner, ids: list[int], args: argparse.Namespace, sampling, cache):
    last = None
    for r in runner.stream(ids, args.max_tokens, sampling, cache):
        print(r.text, end="", flush=True)
        last = r
    print()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | peak memory: "
              f"{last.peak_memory_gb:.2f} GB | backend: {runner.backend}", file=sys.stderr)
    return last


def run(args: argparse.Namespace) -> int:
    from apps.backend import load_runner
    from common.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, seed=args.seed)
    runner = load_runner(args.model, args.backend, args.device, args.dtype)
    fmt = _chat_format(runner.tokenizer, args.no_chat_template)
    if not args.chat:
        ids = _turn_tokens(runner, fmt, args.prompt or DEFAULT_PROMPT, args.system)
        _run_turn(runner, ids, args, sampling, runner.make_cache())
        return 0
    cache, last = runner.make_cache(), None
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            return 0
        if not text.strip():
            return 0
        last = _run_turn(runner, _turn_tokens(runner, fmt, text, args.system, last), args, sampling, cache)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
