"""Shared plumbing of the launch scripts."""
from __future__ import annotations

import sys
from typing import Callable


def fail_cleanly(main: Callable[[], None]) -> None:
    """Run ``main``; print gmmcond's expected errors as one clear line and exit 2 instead of a traceback."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .datasets import DatasetError
    from .registry import RegistryError
    from .trainer import TrainingDiverged

    try:
        main()
    except (ConfigError, CheckpointError, DatasetError, RegistryError, TrainingDiverged, FileExistsError,
            FileNotFoundError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
