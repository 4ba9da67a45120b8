"""Shared plumbing of the launch scripts."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable

from .errors import GmmcondError


def fail_cleanly(main: Callable[[], None]) -> None:
    """Run ``main``; print a :class:`GmmcondError` as one line and exit 2. Anything else stays a traceback.

    On several processes (torchrun, ``accelerate launch --num_processes N``) every process meets the same
    user error, so only process 0 prints it. A second Ctrl-C (stop at once) exits 130 with one line; a training
    stopped by SIGTERM or SIGUSR1 exits :data:`gmmcond.errors.REQUEUE_EXIT` (75) after its checkpoint.
    """
    try:
        main()
    except GmmcondError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: interrupted; stopped at once, so the newest checkpoint is the last one written "
                  "(continue with --resume)", file=sys.stderr, flush=True)
        sys.exit(130)


RESUME_CHOICES = ("latest", "previous", "auto")  # launch/train.py --resume [WHICH]


def bare_resume(argv: list[str]) -> list[str]:
    """``--resume`` followed by an override (``--resume train.steps=9``) means ``--resume latest``: argparse would
    otherwise take the override for the option's optional value and refuse it."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1] not in RESUME_CHOICES):
            out[i] = "--resume=latest"
    return out


def resume_command(argv: list[str] | None = None) -> str:
    """The command that continues this training: the same arguments, ``--resume`` instead of any resume flag."""
    argv = list(sys.argv if argv is None else argv)
    kept, previous = [], None
    for arg in argv:
        dropped = (arg == "--resume" or arg.startswith(("--resume=", "--resume-from=")) or previous == "--resume-from"
                   or arg == "--resume-from" or previous == "--resume" and arg in RESUME_CHOICES)
        if not dropped:
            kept.append(arg)
        previous = arg
    launcher = ["accelerate", "launch"] if "ACCELERATE_MIXED_PRECISION" in os.environ else ["python"]
    return shlex.join([*launcher, *kept, "--resume"])


def guidance_scale(text: str) -> float:
    """argparse type: a classifier-free guidance scale >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got '{text}'") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: unconditional, 1: conditional, > 1: guided), got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
