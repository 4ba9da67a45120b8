"""The training loop and what it alone uses (trackers)."""
from .trainer import Trainer, train  # noqa: F401
