"""Generate images for attribute rows from built components, with optional CFG and guidance wrappers."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling.build import Components
from .guidance import CFGDenoiser
from .samplers import sample


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
