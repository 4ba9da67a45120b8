"""Build a run's components from a resolved config: data, conditioner, Denoiser-wrapped model, schedule, head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import data  # noqa: F401  (fills DATASETS)
from ..registry import CONDITIONERS, DATASETS, MODELS, SCHEDULES
from . import conditioners, schedules  # noqa: F401  (fill the registries)
from .heads import attach
from .models import make_denoiser


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
    attr_names, groups = list(dataset.attr_names), [list(g) for g in dataset.groups]
    conditioner = CONDITIONERS.build(cfg["conditioner"], num_attrs=len(attr_names))
    conditioner.set_groups([[attr_names.index(a) for a in g] for g in groups])
    inner = MODELS.build(cfg["model"], mapping_cond_dim=conditioner.dim)
    denoiser = make_denoiser(inner, **cfg["denoiser"])
    head = None
    if cfg["head"]["type"] != "none":
        head = attach(cfg["head"], denoiser, num_attrs=len(attr_names))
    return Components(dataset, conditioner, denoiser, SCHEDULES.build(cfg["schedule"]), head,
                      attr_names, groups)
