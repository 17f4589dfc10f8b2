"""What every command-line program shares: the model-loading flags, one-line errors and their exit codes."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

DEMO_MODEL = str(Path(__file__).parent / "demo_model")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --backend, --device, --dequantize, --dtype: what `apps.backend.load_runner` takes."""
    p.add_argument("--model", default=DEMO_MODEL,
                   help="model folder or Hugging Face Hub id org/name (default: the bundled demo model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of an org/name --model")
    p.add_argument("--backend", choices=["auto", "mlx", "torch"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="torch device")
    p.add_argument("--dequantize", action="store_true",
                   help="torch: expand a 4-bit / 8-bit folder to float at load instead of keeping it packed")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: as stored)")


def report_errors(body: Callable[[], int], verbose: bool, interrupted: str = "") -> int:
    """Run `body`; any error becomes one line on stderr and exit code 1 (the traceback only when
    `verbose`); Ctrl-C gives 130. Usage errors never get here: argparse exits 2 before."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{interrupted}".rstrip(), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the point is to catch everything
        if verbose:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
