"""What every command-line program shares: one-line errors and their exit codes."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


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
