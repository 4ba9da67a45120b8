"""Experiment trackers through accelerate (``train.log_with: tensorboard``, ``[tensorboard, wandb]``, ...).

metrics.jsonl and the PNG grids are always written; a tracker receives the same metrics and the sample
grids beside them. Nothing is sent anywhere unless ``train.log_with`` names a tracker: tensorboard writes
event files under RUN/trackers/; wandb, mlflow and the rest upload as their own configuration says.
"""
from __future__ import annotations

from pathlib import Path

import json

import numpy as np

from ..errors import ConfigError
from ..registry import closest

INSTALL = {"tensorboard": "pip install 'gmmcond[tensorboard]'"}
IMAGE_TRACKERS = ("tensorboard", "wandb", "aim", "clearml", "swanlab")  # accelerate trackers with log_images


def tracker_names(log_with) -> list[str]:
    """Normalise ``train.log_with`` (None, a name or a list of names) and check that each tracker exists and
    its package is installed; raise a ConfigError naming the fix otherwise."""
    if log_with is None or log_with == "none" or log_with == []:
        return []
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"train.log_with: expected a tracker name or a list of names, got {log_with!r}")
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    valid = [t.value for t in LoggerType if t.value != "all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in valid:
            hint = closest(name, valid)
            raise ConfigError(f"train.log_with: unknown tracker '{name}'" + (f"; did you mean '{hint}'?" if hint else "")
                              + f" Valid trackers: {', '.join(valid)}")
        if name not in available:
            raise ConfigError(f"train.log_with: the '{name}' tracker's package is not installed; "
                              f"{INSTALL.get(name, f'pip install {name}')}, or remove it from train.log_with")
    return names


def logging_dir(run_dir: Path) -> Path:
    """Where file-based trackers (tensorboard) write: RUN/trackers/<project>/."""
    return Path(run_dir) / "trackers"


def log_image(accelerator, name: str, image, step: int) -> None:
    """Send one PIL image to every tracker that takes images (tensorboard, wandb, ...); main process only."""
    array = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name not in IMAGE_TRACKERS:
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({name: [array]}, step=step)


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """The config as flat ``{"train.lr": 0.002, ...}`` with scalar values (what tracker hyperparameters take);
    lists, None and other values become their JSON text."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out
