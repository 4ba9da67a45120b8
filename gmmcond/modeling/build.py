"""Build a run's components from a resolved config: data, conditioner, Denoiser-wrapped model, schedule, head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import data  # fills DATASETS; measures sigma_data
from ..errors import ConfigError
from ..registry import CONDITIONERS, DATASETS, MODELS, SCHEDULES
from . import conditioners, schedules  # noqa: F401  (fill the registries)
from .heads import attach
from .models import AttributeTokens, make_denoiser


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


def resolve_sigma_data(cfg: dict, dataset: Any = None) -> dict:
    """``cfg``, or with ``denoiser.sigma_data: data`` a copy holding the number measured on the dataset (built unless
    given; :func:`gmmcond.data.measure_sigma_data`). A run records the number, so nothing after training needs the
    data for it."""
    if cfg["denoiser"]["sigma_data"] != "data":
        return cfg
    if dataset is None:
        dataset = DATASETS.build(cfg["dataset"])
    return {**cfg, "denoiser": {**cfg["denoiser"], "sigma_data": data.measure_sigma_data(dataset)}}


def build(cfg: dict, dataset: Any = None) -> Components:
    """Build the components of a resolved config (the dataset too, unless one is given)."""
    if dataset is None:
        dataset = DATASETS.build(cfg["dataset"])
    cfg = resolve_sigma_data(cfg, dataset)
    attr_names, groups = list(dataset.attr_names), [list(g) for g in dataset.groups]
    conditioner = CONDITIONERS.build(cfg["conditioner"], num_attrs=len(attr_names))
    conditioner.set_groups([[attr_names.index(a) for a in g] for g in groups])
    if conditioner.tokens:  # the model reads tokens (and, pooled, the flat condition): AttributeTokens unpacks them
        token_dim = cfg["model"].get("cross_cond_dim", 0)
        if not token_dim:
            raise ConfigError(f"conditioner {cfg['conditioner']['type']} hands the model attribute tokens: set "
                              f"model.cross_cond_dim (the token width, e.g. 64) and model.cross_attn_depths (e.g. "
                              f"[false, true, true])")
        inner = MODELS.build(cfg["model"], mapping_cond_dim=conditioner.mapping_dim)
        inner = AttributeTokens(inner, len(attr_names), conditioner.dims_per_attr, token_dim, conditioner.pooled)
    else:
        if cfg["model"].get("cross_cond_dim", 0):
            raise ConfigError("model.cross_cond_dim > 0 needs a conditioner that hands the model tokens "
                              "(conditioner: gmm_tokens); set it to 0 or change the conditioner")
        inner = MODELS.build(cfg["model"], mapping_cond_dim=conditioner.dim)
    denoiser = make_denoiser(inner, **cfg["denoiser"])
    head = None
    if cfg["head"]["type"] != "none":
        head = attach(cfg["head"], denoiser, num_attrs=len(attr_names))
    return Components(dataset, conditioner, denoiser, SCHEDULES.build(cfg["schedule"]), head,
                      attr_names, groups)
