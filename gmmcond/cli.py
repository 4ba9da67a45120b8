"""Shared plumbing of the launch scripts."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import GmmcondError


def fail_cleanly(main: Callable[[], None]) -> None:
    """Run ``main``; print a :class:`GmmcondError` as one line and exit 2. Anything else stays a traceback."""
    try:
        main()
    except GmmcondError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
