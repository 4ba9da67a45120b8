"""Generate images for attribute rows from built components, with optional CFG and guidance wrappers."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..modeling.build import Components
from .guidance import CFGDenoiser, ComposedGuidanceDenoiser
from .samplers import sample
from .settings import SamplingSettings


def composed_conditions(conditioner, terms: list[tuple[int, float]], z: torch.Tensor) -> torch.Tensor:
    """Return the per-term conditions [B, T, dim]: term t specifies attribute ``terms[t][0]`` present, the rest unspecified."""
    if not conditioner.partial:
        raise ConfigError("composed guidance conditions each term on one attribute with the others unspecified, which "
                          "needs a run trained with conditioner.attr_dropout > 0 (e.g. the shapes_compose recipe)")
    b, k = z.shape[0], conditioner.num_attrs
    conds = []
    for index, _ in terms:
        one = torch.zeros(b, k, device=z.device)
        one[:, index] = 1
        conds.append(conditioner.encode(one, z, known=one))
    return torch.stack(conds, 1)


@torch.no_grad()
def generate(
    parts: Components,
    attrs: torch.Tensor,  # [B, K] 0/1 attributes.
    settings: SamplingSettings | None = None,  # Sampler, steps, guidance, seed; None: SamplingSettings() defaults.
    *,
    latents: torch.Tensor | None = None,  # [B, K, N] GMM latents; None draws them from the conditioner.
    callback=None,
    model: nn.Module | None = None,  # Overrides parts.denoiser (e.g. a guidance wrapper).
    head_target: torch.Tensor | None = None,  # [B, K] targets for a HeadGuidedDenoiser model.
    known: torch.Tensor | None = None,  # [B, K] 1 = specified; 0 = unspecified (needs a run with attr_dropout > 0).
    compose: list[tuple[int, float]] | None = None,  # (attribute index, weight) terms for composed guidance.
) -> torch.Tensor:
    """Sample images for the given attribute rows; returns images [B, 3, H, W] in [-1, 1].

    With ``compose``, the condition is D_null + sum_t w_t (D_t - D_null), term t specifying its attribute
    alone as present (``attrs`` and ``cfg_scale`` are then unused): :class:`ComposedGuidanceDenoiser`.

    Changed in 0.2: ``sampler``, ``steps``, ``cfg_scale``, ``cfg_null`` and ``seed`` moved into ``settings``
    (:class:`gmmcond.sampling.settings.SamplingSettings`): ``generate(parts, attrs, SamplingSettings(steps=30,
    seed=1))`` where ``generate(parts, attrs, steps=30, seed=1)`` was written before.
    """
    settings = settings or SamplingSettings()
    gen = torch.Generator().manual_seed(settings.seed)
    n, size = len(attrs), parts.dataset.size
    device = next(parts.denoiser.parameters()).device
    z = draw_latents(parts, n, gen, latents)
    denoiser, extra_args = conditioned(parts, attrs, z, model=model, cfg_scale=settings.cfg_scale, known=known,
                                       compose=compose, head_target=head_target, cfg_null=settings.cfg_null,
                                       cfg_interval=settings.cfg_interval)
    noise = torch.randn(n, 3, size, size, generator=gen).to(device)
    sigmas = parts.schedule.sigmas(settings.steps).to(device)
    return sample(settings.sampler, denoiser, noise, sigmas, extra_args=extra_args, callback=callback, generator=gen)


def draw_latents(parts: Components, n: int, gen: torch.Generator, latents: torch.Tensor | None = None):
    """``latents`` if given, else ``n`` fresh ones from the conditioner (None for an unconditional run)."""
    if latents is not None or not parts.conditioner.dim:
        return latents
    return parts.conditioner.sample_latents(n, gen)


def conditioned(parts: Components, attrs: torch.Tensor, z: torch.Tensor | None, *, model: nn.Module | None = None,
                cfg_scale: float = 1.0, known: torch.Tensor | None = None, compose: list[tuple[int, float]] | None = None,
                head_target: torch.Tensor | None = None, cfg_null: str = "dropped",
                cfg_interval: tuple = ()) -> tuple[nn.Module, dict]:
    """Return the k-diffusion model and its ``extra_args`` for attribute rows ``attrs`` with latents ``z``.

    The model is ``model`` (default the run's denoiser), wrapped for CFG when ``cfg_scale != 1`` or for
    composed guidance with ``compose``, either pushing away from the condition ``cfg_null`` names
    (:meth:`Conditioner.guidance_null`), CFG only at the sigmas in a non-empty ``cfg_interval``; ``extra_args`` holds
    the encoded ``mapping_cond`` (and ``head_target``).
    """
    denoiser = model if model is not None else parts.denoiser
    device = next(parts.denoiser.parameters()).device
    extra_args = {}
    cond_module = parts.conditioner
    if cond_module.dim:
        z = z.to(device)
        if compose:
            extra_args["mapping_cond"] = composed_conditions(cond_module, compose, z)
            weights = [w for _, w in compose]
            denoiser = ComposedGuidanceDenoiser(denoiser, weights, cond_module.guidance_null(1, cfg_null)[0].to(device))
        else:
            extra_args["mapping_cond"] = cond_module.encode(attrs.to(device), z, known=None if known is None else known.to(device))
            if cfg_scale != 1.0:
                denoiser = CFGDenoiser(denoiser, cfg_scale, cond_module.guidance_null(1, cfg_null)[0].to(device),
                                       interval=cfg_interval)
    elif compose:
        raise ConfigError("composed guidance needs a conditional run; this one is unconditional")
    if head_target is not None:
        extra_args["head_target"] = head_target.to(device)
    return denoiser, extra_args
