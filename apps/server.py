"""Serve a Llama 4 model over an OpenAI-compatible HTTP API, many requests at once:
`python -m apps.server [--model PATH] [--port 8080]`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus). Binds 127.0.0.1 unless --host says otherwise. Ctrl-C or SIGTERM: stop
taking requests, end the running ones, exit 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from apps.cli import add_model_args, report_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apps.server", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch", type=int, default=16, help="rows generated together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429s")
    p.add_argument("--prompt-cache-gb", type=float, default=2.0, help="prompt cache size (0: off)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="most tokens one choice may ask for")
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens prefilled per step")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="largest image (413 above)")
    p.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    return p


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_state(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model and wire the engine, the prompt builder and the metrics together; (state, runner)."""
    from apps.backend import load_runner
    from apps.server_app import ServerState
    from apps.server_engine import Engine
    from apps.server_metrics import Metrics
    from apps.server_prompt import Limits, PromptBuilder
    from common.generation_defaults import generation_defaults
    from common.hub import is_hub_id, resolve_model
    from common.prompt_cache import PromptCache
    from common.vision_checkpoint import no_vision

    hub = not Path(args.model).expanduser().exists() and is_hub_id(args.model)
    model_id = args.model if hub else None  # a Hub model is known by its id
    args.model = str(resolve_model(args.model, args.revision))  # a Hub id becomes its cached snapshot
    runner = load_runner(args.model, args.backend, args.device, args.dtype, show_progress=False,
                         dequantize=args.dequantize)
    cache = PromptCache(int(args.prompt_cache_gb * 1e9)) if args.prompt_cache_gb > 0 else None

    def make_generator() -> Any:
        return runner.module.BatchGenerator(runner.model, runner.tokenizer, max_batch=args.max_batch,
                                            prefill_step_size=args.prefill_step_size, prompt_cache=cache)

    metrics = Metrics()
    limits = Limits(max_tokens=args.max_tokens_limit, max_seq_len=runner.model.args.max_seq_len,
                    image_bytes=int(args.max_body_mb * 1e6), image_pixels=args.max_image_pixels)
    builder = PromptBuilder(runner.tokenizer, runner.model.args.vision_args, limits, generation_defaults(args.model),
                            no_vision(runner.model.args))
    return ServerState(engine=Engine(make_generator, args.max_queue, metrics, runner.world), builder=builder,
                       metrics=metrics, model_id=model_id or Path(args.model).name, created=int(time.time()),
                       api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 1e6)), runner




def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from apps.backend import quiet_unless_first
    from apps.server_app import create_app

    for name in ("max_batch", "max_queue", "max_tokens_limit", "prefill_step_size", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not _loopback(args.host):
        print(f"warning: binding {args.host}: the server is reachable from other machines"
              + ("" if args.api_key else " and has no --api-key"), file=sys.stderr)
    state, runner = build_state(args)
    engine, world = state.engine, runner.world
    if world is not None and world.rank != 0:  # a tensor-parallel rank: rank 0 serves, this one follows
        quiet_unless_first(world)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # it stops when rank 0 says so
        engine.follow()
        return 0
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    http = threading.Thread(target=server.run, name="http", daemon=True)  # no signal handlers off the main thread

    def stop(sig: int, frame: Any) -> None:
        engine.drain()  # open streams end now, so the shutdown does not wait on them
        server.force_exit = server.should_exit  # a second Ctrl-C: at once
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    while http.is_alive() and not server.started:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError(f"could not serve on {args.host}:{args.port} (is the port in use?)")
    ranks = "" if world is None else f", {world.size} tensor-parallel ranks"
    print(f"serving {state.model_id} ({runner.backend}{ranks}) on http://{args.host}:{args.port}", file=sys.stderr,
          flush=True)
    engine.run(until=lambda: not http.is_alive())  # the model stays in this thread
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(lambda: _serve(args), args.verbose, "interrupted")


if __name__ == "__main__":
    raise SystemExit(main())
