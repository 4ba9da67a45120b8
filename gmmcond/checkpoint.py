"""Atomic checkpoints with a ``latest`` pointer, and clear errors for missing or corrupt files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not a gmmcond checkpoint."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_NNNNNNN.pt`` atomically, point ``latest`` at it, prune old ones."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    atomic_write_bytes(folder / "latest", path.name.encode())
    for old in sorted(folder.glob("step_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the checkpoint ``latest`` points at, or None if the run has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing; point it at one of "
                              f"{[p.name for p in sorted(pointer.parent.glob('step_*.pt'))]} or start a new run")
    return path


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, or raise CheckpointError saying what to do."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        others = sorted(p.name for p in path.parent.glob("step_*.pt") if p != path)
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {exc}). Delete it and point "
            f"{path.parent / 'latest'} at an earlier one ({others or 'none left'}), or start a new run."
        ) from exc
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a gmmcond checkpoint (no 'step'/'model' entries)")
    return state


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2) + "\n").encode())
