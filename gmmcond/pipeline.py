"""Build a run's components from a resolved config, load trained runs, and generate images."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import heads  # noqa: F401  (fills HEADS and LOSSES)
from . import conditioners, datasets, models, schedules  # noqa: F401  (fill the registries)
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .config import resolve
from .models import make_denoiser
from .registry import CONDITIONERS, DATASETS, HEADS, MODELS, SCHEDULES
from .sampling import CFGDenoiser, sample


@dataclass
class Components:
    """Everything a config builds: data, conditioner, Denoiser-wrapped model, schedule, optional head."""

    dataset: Any
    conditioner: nn.Module
    denoiser: nn.Module
    schedule: Any
    head: nn.Module | None
    attr_names: list[str]
    groups: list[list[str]]


def build(cfg: dict, dataset: Any = None) -> Components:
    """Build the components of a resolved config (the dataset too, unless one is given)."""
    if dataset is None:
        dataset = DATASETS.build(cfg["dataset"])
    attr_names = list(dataset.attr_names)
    conditioner = CONDITIONERS.build(cfg["conditioner"], num_attrs=len(attr_names))
    inner = MODELS.build(cfg["model"], mapping_cond_dim=conditioner.dim)
    denoiser = make_denoiser(inner, **cfg["denoiser"])
    head = None
    if cfg["head"]["type"] != "none":
        head = heads.attach(cfg["head"], denoiser, num_attrs=len(attr_names))
    return Components(dataset, conditioner, denoiser, SCHEDULES.build(cfg["schedule"]), head,
                      attr_names, [list(g) for g in getattr(dataset, "groups", [])])


def parse_attrs(text: str, attr_names: list[str]) -> torch.Tensor:
    """Turn ``"circle,red,large"`` into a 0/1 vector over ``attr_names``; unknown names list the valid ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in attr_names]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; valid attributes: {', '.join(attr_names)}")
    return torch.tensor([float(n in names) for n in attr_names])


def describe(attrs: torch.Tensor, attr_names: list[str]) -> str:
    """Return the comma-separated names of the attributes set in a 0/1 vector."""
    return ",".join(n for n, a in zip(attr_names, attrs.tolist()) if a > 0.5) or "(none)"


@dataclass
class DatasetInfo:
    """What a run directory records of its dataset (dataset.json): enough to sample without the data."""

    attr_names: list[str]
    groups: list[list[str]]
    size: int


def dataset_info(dataset: Any) -> dict:
    """Return the dataset facts a run directory records."""
    return {"attr_names": list(dataset.attr_names), "groups": [list(g) for g in dataset.groups], "size": dataset.size}


@dataclass
class LoadedRun:
    """A trained run: its config, components with EMA weights loaded, and the checkpoint step."""

    cfg: dict
    parts: Components
    step: int


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedRun:
    """Load a run directory's resolved config and its EMA weights (from the latest checkpoint)."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a run directory written by launch/train.py?")
    cfg = resolve(yaml.safe_load(config_file.read_text()))
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first")
    state = load_checkpoint(path)
    info = json.loads((run_dir / "dataset.json").read_text())
    parts = build(cfg, dataset=DatasetInfo(info["attr_names"], info["groups"], info["size"]))
    parts.denoiser.inner_model.load_state_dict(state["ema"])
    if parts.head is not None:  # the head is trained, not averaged: take its live weights
        parts.head.load_state_dict({k[len("head."):]: v for k, v in state["model"].items() if k.startswith("head.")})
        parts.head.eval()
    parts.denoiser.eval()
    return LoadedRun(cfg, parts, state["step"])


@torch.no_grad()
def generate(
    parts: Components,
    attrs: torch.Tensor,  # [B, K] 0/1 attributes.
    *,
    sampler: Any = "dpmpp_2m",  # SAMPLERS key or {type, **options}.
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    latents: torch.Tensor | None = None,  # [B, K, N] GMM latents; None draws them from the conditioner.
    callback=None,
    model: nn.Module | None = None,  # Overrides parts.denoiser (e.g. a guidance wrapper).
    head_target: torch.Tensor | None = None,  # [B, K] targets for a HeadGuidedDenoiser model.
) -> torch.Tensor:
    """Sample images for the given attribute rows; returns images [B, 3, H, W] in [-1, 1]."""
    denoiser = model if model is not None else parts.denoiser
    device = next(parts.denoiser.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n, size = len(attrs), parts.dataset.size
    extra_args = {}
    cond_module = parts.conditioner
    if cond_module.dim:
        z = cond_module.sample_latents(n, gen) if latents is None else latents
        extra_args["mapping_cond"] = cond_module.encode(attrs.to(device), z.to(device))
        if cfg_scale != 1.0:
            denoiser = CFGDenoiser(denoiser, cfg_scale, cond_module.unconditional(1)[0].to(device))
    if head_target is not None:
        extra_args["head_target"] = head_target.to(device)
    noise = torch.randn(n, 3, size, size, generator=gen).to(device)
    sigmas = parts.schedule.sigmas(steps).to(device)
    return sample(sampler, denoiser, noise, sigmas, extra_args=extra_args, callback=callback, generator=gen)



def export_safetensors(path: Path, inner_model: nn.Module, cfg: dict, info: dict, step: int) -> None:
    """Write EMA weights to safetensors with the resolved config and dataset facts in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in inner_model.state_dict().items()}
    meta = {"config": json.dumps(cfg), "dataset": json.dumps(info), "step": str(step), "format": "gmmcond-ema-v1"}
    save_file(tensors, str(path), metadata=meta)
