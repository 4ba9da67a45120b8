"""How to sample, in one object: :class:`SamplingSettings` is built once from a run's ``sample`` section plus
overrides (a command line's flags, an experiment's arm), validated there, and passed as it is through
generation, sample sheets, evaluation, editing and the experiments.

A derived setting for one call (another seed per batch, fewer steps for a probe) is
``dataclasses.replace(settings, seed=...)``, which validates again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from ..config import GUIDANCE_NULLS, SAMPLER_FIXED_ARGS, check_cfg_interval, resolve_node
from ..errors import ConfigError
from ..modeling.precision import DTYPES, autocast, sampling_precision
from ..registry import SAMPLERS
from .requests import DEFAULT_OPEN, OPEN_MODES


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides how images are sampled from a trained model, beside the model and the conditions."""

    sampler: Any = "dpmpp_2m"  # A SAMPLERS key or {type: key, **options}.
    steps: int = 50  # Model evaluations (a CFG step counts one here, two in compute).
    cfg_scale: float = 1.0  # Classifier-free guidance scale (1: plain conditional).
    cfg_null: str = "dropped"  # What guidance pushes from: dropped (the trained null) or all_unknown (partial runs).
    seed: int = 0  # Seeds the noise, the latents and every stochastic sampler's fresh noise.
    precision: str | None = None  # Sampling autocast: fp32 | bf16 | fp16; None: the run's where this machine runs it.
    open: str = DEFAULT_OPEN  # What an attribute a request leaves open means: data | absent | model.
    head_scale: float = 0.0  # Guidance by the run's classifier head (0: off).
    cfg_interval: tuple = ()  # (lo, hi): guide only where lo < sigma <= hi, plain conditional elsewhere; (): always.

    def __post_init__(self):
        resolve_node("sampler", self.sampler, SAMPLERS, SAMPLER_FIXED_ARGS)  # an unknown key or option names itself
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sampling steps must be an integer >= 1, got {self.steps!r}")
        if self.cfg_scale < 0:
            raise ConfigError(f"cfg_scale must be >= 0 (1 is plain conditional sampling), got {self.cfg_scale}")
        check_cfg_interval(self.cfg_interval)
        object.__setattr__(self, "cfg_interval", tuple(float(v) for v in self.cfg_interval))
        if self.cfg_null not in GUIDANCE_NULLS:
            raise ConfigError(f"cfg_null must be one of {', '.join(GUIDANCE_NULLS)}, got {self.cfg_null!r}")
        if self.open not in OPEN_MODES:
            raise ConfigError(f"open must be one of {', '.join(OPEN_MODES)}, got {self.open!r}")
        if self.precision is not None and self.precision not in DTYPES:
            raise ConfigError(f"sampling precision must be one of {', '.join(DTYPES)} (or unset), got {self.precision!r}")
        if self.head_scale < 0:
            raise ConfigError(f"head_scale must be >= 0, got {self.head_scale}")

    @classmethod
    def from_config(cls, section: Mapping, overrides: Mapping | None = None) -> "SamplingSettings":
        """Settings from a run's ``sample`` section (sampler, steps, cfg_scale, cfg_null, seed) with ``overrides``
        on top; an override of None keeps the section's value, and a name that is no setting is an error."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"unknown sampling setting(s) {unknown}; valid: {', '.join(sorted(names))}")
        base = {k: section[k] for k in ("sampler", "steps", "cfg_scale", "cfg_null", "cfg_interval", "seed") if k in section}
        return cls(**{**base, **given})

    @classmethod
    def of_run(cls, cfg: dict, settings: "SamplingSettings | Mapping | None" = None) -> "SamplingSettings":
        """``settings`` as they are, or built from the run config ``cfg``'s ``sample`` section plus the overrides
        ``settings`` maps (None: the run's own)."""
        if isinstance(settings, SamplingSettings):
            return settings
        return cls.from_config(cfg["sample"], settings)

    def autocast(self, cfg: dict, device: torch.device | str):
        """The autocast context to sample the run ``cfg`` under on ``device``: this precision, else the run's
        training precision where ``device`` runs it natively, else fp32."""
        return autocast(torch.device(device).type, self.precision_for(cfg, device))

    def precision_for(self, cfg: dict, device: torch.device | str) -> str:
        """The precision name :meth:`autocast` uses (what an evaluation records)."""
        return self.precision or sampling_precision(cfg, torch.device(device).type)
