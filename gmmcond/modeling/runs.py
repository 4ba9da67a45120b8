"""Read trained runs back: the resolved config, dataset facts and weights of a run directory.

Sampling and evaluation need only the EMA weights (and a head's live weights), so they read
``ema.safetensors`` when it is at least as new as the latest checkpoint, else the checkpoint, loaded
weights-only. Nothing read from a run directory executes code.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import resolve, yaml_load
from ..data import upgrade_dataset_config
from ..data.prior import PRIOR_FILE, AttributePrior, load_prior, save_prior
from ..errors import CheckpointError, DatasetError, RunError
from ..io import checkpoint_step, export_safetensors, latest_checkpoint, load_checkpoint, load_safetensors, read_json
from .build import Components, build
from ..registry import DATASETS

HEAD_PREFIX = "head."


@dataclass
class DatasetInfo:
    """What a run directory records of its dataset (dataset.json): enough to sample without the data."""

    attr_names: list[str]
    groups: list[list[str]]
    size: int


def dataset_info(dataset) -> dict:
    """Return the dataset facts a run directory records."""
    return {"attr_names": list(dataset.attr_names), "groups": [list(g) for g in dataset.groups], "size": dataset.size}


def run_prior(run_dir: str | Path, cfg: dict, names: list[str], log=None) -> AttributePrior:
    """The attribute prior of a run: ``RUN/attr_prior.json``, written when training started; for a run trained
    before runs carried it, counted from its dataset config (the training split) and written there, which
    needs the data at hand (else a RunError naming the fix)."""
    path = Path(run_dir) / PRIOR_FILE
    if path.exists():
        prior = load_prior(path)
    else:
        try:
            prior = AttributePrior.from_dataset(DATASETS.build(cfg["dataset"]))
        except DatasetError as exc:
            raise RunError(f"{run_dir} has no {PRIOR_FILE} (trained before runs carried their attribute prior) and its "
                           f"training data cannot be read to count it ({exc}); make the data readable where config.yaml "
                           f"says, or ask with open=absent (--open absent), which draws nothing") from None
        try:
            save_prior(path, prior)
            where = f"wrote {path}"
        except OSError as exc:
            where = f"could not write {path} ({exc.strerror}); it is counted again next time"
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"note: counted the attribute prior of {run_dir} from its dataset ({prior.total} items, "
            f"{len(prior.rows)} distinct rows); {where}")
    if prior.names != list(names):
        raise RunError(f"{path} is over the attributes {prior.names}, the run's are {list(names)}; delete it to count "
                       f"it again from the run's dataset")
    return prior


@dataclass
class LoadedRun:
    """A trained run: its config, components with EMA weights loaded, and the step of those weights."""

    cfg: dict
    parts: Components
    step: int
    source: Path  # The file the weights came from.
    run_dir: Path | None = None
    _prior: AttributePrior | None = None

    @property
    def prior(self) -> AttributePrior:
        """The run's attribute prior (:func:`run_prior`), read on first use."""
        if self._prior is None:
            if self.run_dir is None:
                raise RunError("this run was not loaded from a run directory, so it has no attribute prior; "
                               "ask with open=absent")
            self._prior = run_prior(self.run_dir, self.cfg, self.parts.attr_names)
        return self._prior


def sampling_weights(parts: Components) -> dict[str, torch.Tensor]:
    """Return what sampling needs: the (EMA) inner model's weights and, with a head, the head's under ``head.``."""
    tensors = dict(parts.denoiser.inner_model.state_dict())
    if parts.head is not None:
        tensors.update({HEAD_PREFIX + k: v for k, v in parts.head.state_dict().items()})
    return tensors


def export_run(path: str | Path, parts: Components, cfg: dict, step: int) -> None:
    """Write a run's sampling weights to safetensors, with the config and dataset facts in the metadata."""
    export_safetensors(path, sampling_weights(parts), cfg, dataset_info(parts.dataset), step)


LIVE_PREFIX = "denoiser.inner_model."  # the inner model's keys in a checkpoint's "model" (the trainer's module)
RUN_WEIGHTS = ("ema", "live")  # what load_run can load: the averaged weights, or the trained ones before averaging
POSTHOC = "posthoc:"  # weights="posthoc:SIGMA_REL": a post-hoc EMA of that length from the run's tracks


def posthoc_sigma_rel(weights: str) -> float | None:
    """The sigma_rel of a ``posthoc:SIGMA_REL`` weights choice; None for ``ema`` and ``live``; else a RunError."""
    if weights in RUN_WEIGHTS:
        return None
    if weights.startswith(POSTHOC):
        try:
            return float(weights[len(POSTHOC):])
        except ValueError:
            pass
    raise RunError(f"weights must be 'ema', 'live' or 'posthoc:SIGMA_REL' (e.g. posthoc:0.08, for a run trained with "
                   f"train.posthoc_ema), got {weights!r}")


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, weights: str = "ema") -> LoadedRun:
    """Load a run directory's resolved config and its EMA weights (export or checkpoint, whichever is newest);
    ``weights="live"`` loads the trained, un-averaged weights of the checkpoint instead (to judge the EMA), and
    ``weights="posthoc:0.08"`` an EMA of relative length 0.08 reconstructed after training from the run's post-hoc
    EMA tracks (``train.posthoc_ema``; at the last snapshot, or at ``checkpoint``'s step)."""
    sigma_rel = posthoc_sigma_rel(weights)
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise RunError(f"{config_file} not found: is {run_dir} a run directory written by launch/train.py?")
    raw = yaml_load(config_file.read_text(), str(config_file))
    if isinstance(raw.get("dataset"), dict):
        raw["dataset"] = upgrade_dataset_config(raw["dataset"])
    cfg = resolve(raw)
    info = read_json(run_dir / "dataset.json")
    parts = build(cfg, dataset=DatasetInfo(info["attr_names"], info["groups"], info["size"]))
    export = run_dir / "ema.safetensors"
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    loaded = None
    if checkpoint is None and export.exists() and weights == "ema":
        try:
            loaded = load_safetensors(export)
        except CheckpointError as exc:
            if path is None:
                raise CheckpointError(f"{exc}; the run has no checkpoint to fall back on: retrain it") from None
            print(f"note: {export} is unreadable (truncated or corrupt); using the EMA weights of {path} instead "
                  f"(rewrite the export with: launch/sample.py --run {run_dir} --export {export})", file=sys.stderr)
    if loaded is not None and (path is None or loaded[1]["step"] >= checkpoint_step(path)):
        tensors, meta = loaded
        step, source = meta["step"], export
        inner = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    else:
        if path is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first")
        state = load_checkpoint(path)
        step, source, inner = state["step"], path, state["ema"]
        if weights == "live":
            inner = {k[len(LIVE_PREFIX):]: v for k, v in state["model"].items() if k.startswith(LIVE_PREFIX)}
        head = {k[len(HEAD_PREFIX):]: v for k, v in state["model"].items() if k.startswith(HEAD_PREFIX)}
    if sigma_rel is not None:
        from ..engine.posthoc_ema import reconstruct

        inner, facts = reconstruct(run_dir, sigma_rel, checkpoint_step(path) if checkpoint else None)
        step, source = facts["step"], run_dir / f"posthoc_ema (sigma_rel {sigma_rel:g})"
    parts.denoiser.inner_model.load_state_dict(inner)
    if parts.head is not None:  # the head is trained, not averaged: its live weights
        parts.head.load_state_dict(head)
        parts.head.eval()
    parts.denoiser.eval()
    return LoadedRun(cfg, parts, step, source, run_dir)
