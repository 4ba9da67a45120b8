"""Errors meant for a user: one root, :class:`GmmcondError`, and a subclass per kind.

Entry points (``launch/*.py``) print exactly these as one line and exit 2. Any other exception is a bug
in gmmcond or in code it calls, and surfaces as a traceback.
"""
from __future__ import annotations


class GmmcondError(Exception):
    """Root of every error whose message tells a user what to change."""

    def __str__(self) -> str:  # KeyError-style subclasses would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class ConfigError(GmmcondError, ValueError):
    """A config names an unknown key, an unknown registry entry, or a value of the wrong type."""


class RegistryError(GmmcondError, KeyError):
    """An unknown or duplicate registry key."""


class DatasetError(GmmcondError):
    """A dataset's files are missing or malformed, or a dataset option is invalid."""


class AttributeSpecError(GmmcondError, ValueError):
    """An attribute request names an unknown attribute or contradicts a mutually exclusive group."""


class CheckpointError(GmmcondError):
    """A checkpoint is missing, truncated, not a gmmcond checkpoint, or asks to run code on load."""


class RunError(GmmcondError):
    """A run directory is missing, already taken, or does not fit the request (e.g. resumed with other settings)."""


class TrainingDiverged(GmmcondError):
    """The loss became NaN or infinite; the weights were not updated with it."""


class PrecisionError(GmmcondError):
    """The requested precision or compilation cannot run on this machine."""


class Interrupted(GmmcondError):
    """Training was stopped by a signal after a checkpoint; ``--resume`` continues it exactly. ``exit_code``: 2 for
    Ctrl-C (SIGINT), :data:`REQUEUE_EXIT` for SIGTERM/SIGUSR1 (a scheduler's preemption or time limit)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


REQUEUE_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped cleanly, try again; a batch script requeues on it


class StorageError(GmmcondError):
    """A file could not be written (a full disk, a read-only folder): the previous file is left as it was."""
