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


def require_at_least_one(*flags: tuple[str, int | None], hints: dict[str, str] | None = None) -> None:
    """Raise ``ValueError`` for the first ``(flag, value)`` below 1 (None: not given), adding
    ``hints[flag]`` when there is one."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}{(hints or {}).get(flag, '')}")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one ``warning:`` line on stderr (no source file and line: they mean nothing to a user)."""
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def run_command(a: argparse.Namespace, indent: int | None = None) -> int:
    """Run ``a.fn(a)``; print its result as JSON on stdout, or one ``error:`` line (exit 2);
    warnings (each said once) as ``warning:`` lines."""
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning afterwards
            warnings.simplefilter("default")
            warnings.showwarning = _warning_line
            out = a.fn(a)
    except USER_ERRORS as ex:
        # on a terminal a progress line may still be open (it ends with \r, not \n)
        print(("\n" if sys.stderr.isatty() else "") + f"error: {ex}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every output is written atomically, so nothing half-written is left
        print(("\n" if sys.stderr.isatty() else "") + "interrupted: outputs are written whole or not at "
              "all, so nothing half-written is left", file=sys.stderr)
        return 130
    print(json.dumps(out, indent=indent))
    return 0
