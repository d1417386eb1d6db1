"""What both command lines share: progress on stderr and one clear error line."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

# errors a user can cause with their input; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, InterruptedError, KeyError, NotImplementedError)  # OSError: paths, disk


def progress_stderr(frac: float, msg: str) -> None:
    print(f"\r[{frac * 100:5.1f}%] {msg}\033[K", end="" if frac < 1 else "\n", file=sys.stderr, flush=True)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_command(a: argparse.Namespace, indent: int | None = None) -> int:
    """Run ``a.fn(a)``; print its result as JSON on stdout, or one ``error:`` line (exit 2)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            out = a.fn(a)
    except USER_ERRORS as ex:
        # on a terminal a progress line may still be open (it ends with \r, not \n)
        print(("\n" if sys.stderr.isatty() else "") + f"error: {ex}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=indent))
    return 0
