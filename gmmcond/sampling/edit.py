"""Attribute editing of existing images: SDEdit and deterministic (DDIM) inversion.

* SDEdit (Meng et al. 2022): noise the image to the sigma at ``strength`` and denoise it under the new
  attributes with any sampler. Strength 1 starts from (image + sigma_max noise), nearly a fresh sample;
  small strengths keep more of the image and change less.
* Inversion: run k-diffusion's ``sample_euler`` (x0_reproject with renoise 0, i.e. DDIM) backwards from the
  image under its own attributes, to the sigma at ``strength``, then forward under the edited ones with the
  same sigmas and the same GMM latent. Each backward step solves the Euler step exactly by fixed-point
  iteration (``iters``), so inverting then regenerating with unchanged attributes returns the image up to
  the iteration's residual (``iters=0`` is the usual DDIM inversion, which uses the derivative at the known
  end of the step instead).

Attribute rows are 0/1 over the run's attributes; an edit request (``"square,blue"``) changes only what it
names (:func:`apply_edit`), so the unrequested attributes are asked for as they were.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.attrs import AttrRequest
from ..errors import ConfigError
from ..modeling.build import Components
from ..registry import SAMPLERS
from .generate import conditioned, draw_latents
from .samplers import sample
from .settings import SamplingSettings


def apply_edit(source: torch.Tensor, request: AttrRequest, names: list[str], groups: list[list[str]] = ()) -> torch.Tensor:
    """Return ``source`` [B, K] with the request's attributes set: a listed one present (the rest of its
    mutually exclusive group absent), ``~name`` absent, every unlisted attribute as in ``source``."""
    out = source.clone().float()
    for k, name in enumerate(names):
        if not request.known[k]:
            continue
        if request.values[k] > 0.5:
            for group in groups:
                if name in group:
                    out[:, [names.index(g) for g in group]] = 0
        out[:, k] = request.values[k]
    return out


def start_sigmas(parts: Components, steps: int, strength: float, device) -> torch.Tensor:
    """The tail of the run's ``steps``-step schedule that starts at ``strength`` (1: sigma_max; 0.5: halfway)."""
    if not 0 < strength <= 1:
        raise ConfigError(f"edit strength must be in (0, 1], got {strength}")
    sigmas = parts.schedule.sigmas(steps).to(device)
    start = min(round((1 - strength) * steps), steps - 1)
    return sigmas[start:]


# what an edit samples with where no settings are given: k-diffusion's Euler sampler (DDIM), 30 steps
EDIT_DEFAULTS = SamplingSettings(sampler="euler", steps=30)


@torch.no_grad()
def sdedit(parts: Components, images: torch.Tensor, attrs: torch.Tensor, settings: SamplingSettings | None = None, *,
           strength: float = 0.6, latents: torch.Tensor | None = None, model: nn.Module | None = None) -> torch.Tensor:
    """Noise ``images`` [B, 3, H, W] in [-1, 1] to the sigma at ``strength`` and denoise them under ``attrs`` [B, K]
    with the sampler, steps, guidance and seed of ``settings`` (default :data:`EDIT_DEFAULTS`)."""
    settings = settings or EDIT_DEFAULTS
    device = next(parts.denoiser.parameters()).device
    gen = torch.Generator().manual_seed(settings.seed)
    z = draw_latents(parts, len(images), gen, latents)
    denoiser, extra_args = conditioned(parts, attrs, z, model=model, cfg_scale=settings.cfg_scale,
                                       cfg_interval=settings.cfg_interval)
    noise = torch.randn(images.shape, generator=gen).to(device)
    sigmas = start_sigmas(parts, settings.steps, strength, device)
    return sample(settings.sampler, denoiser, noise, sigmas, extra_args=extra_args, generator=gen, init=images.to(device))


@torch.no_grad()
def invert_euler(model: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 iters: int = 3) -> torch.Tensor:
    """Invert ``k_diffusion.sampling.sample_euler`` (no churn) over ``sigmas`` (descending, as it takes them):
    return the x at ``sigmas[0]`` that it maps to ``x`` at ``sigmas[-1]``.

    Any k-diffusion model works. Backward step i finds x_i with x_{i+1} = x_i + (s_{i+1} - s_i) (x_i - D(x_i, s_i)) / s_i
    by the fixed-point iteration x_i <- x_{i+1} - (s_{i+1} - s_i) d(x_i, s_i), started from x_i = x_{i+1}.
    """
    if iters < 0:
        raise ConfigError(f"inversion iterations must be >= 0, got {iters}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in reversed(range(len(sigmas) - 1)):
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        target, guess = x, x
        for _ in range(iters + 1):
            d = (guess - model(guess, sigma * s_in, **extra_args)) / sigma
            guess = target - dt * d
        x = guess
    return x


@torch.no_grad()
def invert(parts: Components, images: torch.Tensor, attrs: torch.Tensor, settings: SamplingSettings | None = None, *,
           strength: float = 1.0, latents: torch.Tensor | None = None, iters: int = 3,
           model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``images`` under their attributes ``attrs`` with the steps, guidance and seed (of the latents) of
    ``settings``; return (x at the start sigma, the GMM latents used)."""
    settings = settings or EDIT_DEFAULTS
    device = next(parts.denoiser.parameters()).device
    z = draw_latents(parts, len(images), torch.Generator().manual_seed(settings.seed), latents)
    denoiser, extra_args = conditioned(parts, attrs, z, model=model, cfg_scale=settings.cfg_scale,
                                       cfg_interval=settings.cfg_interval)
    sigmas = start_sigmas(parts, settings.steps, strength, device)
    return invert_euler(denoiser, images.to(device), sigmas, extra_args, iters), z


@torch.no_grad()
def regenerate(parts: Components, x: torch.Tensor, attrs: torch.Tensor, latents: torch.Tensor | None,
               settings: SamplingSettings | None = None, *, strength: float = 1.0,
               model: nn.Module | None = None) -> torch.Tensor:
    """Run ``sample_euler`` from an inverted ``x`` under ``attrs`` with the same sigmas and latents as :func:`invert`."""
    settings = settings or EDIT_DEFAULTS
    device = next(parts.denoiser.parameters()).device
    denoiser, extra_args = conditioned(parts, attrs, latents, model=model, cfg_scale=settings.cfg_scale,
                                       cfg_interval=settings.cfg_interval)
    sigmas = start_sigmas(parts, settings.steps, strength, device)
    return SAMPLERS.get("euler")(denoiser, x.to(device), sigmas, extra_args=extra_args, disable=True)


@torch.no_grad()
def edit_by_inversion(parts: Components, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                      settings: SamplingSettings | None = None, *, strength: float = 1.0, iters: int = 3,
                      latents: torch.Tensor | None = None, model: nn.Module | None = None) -> torch.Tensor:
    """Invert ``images`` under ``source`` attributes, then regenerate them under ``target`` (same latents, same
    sigmas). Changed in 0.2: ``steps``, ``cfg_scale`` and ``seed`` moved into ``settings``."""
    x, z = invert(parts, images, source, settings, strength=strength, latents=latents, iters=iters, model=model)
    return regenerate(parts, x, target, z, settings, strength=strength, model=model)


METHODS = ("invert", "sdedit")


@torch.no_grad()
def edit_rows(parts: Components, image: torch.Tensor, source: torch.Tensor, targets: list[torch.Tensor],
              labels: list[str], settings: SamplingSettings | None = None, *, methods=METHODS, n: int = 4,
              strength: float | None = None, iters: int = 3) -> tuple[list[torch.Tensor], list[str]]:
    """Edit one ``image`` [3, H, W] with source attributes ``source`` [K] into each target row [K]: per target
    and method, a grid row of the original followed by ``n`` edits (n GMM latents; for SDEdit, n noises too).

    ``strength`` defaults to 1 for inversion and 0.6 for SDEdit. Returns the rows and their captions.
    """
    rows, captions = [], []
    images, src = image[None].expand(n, -1, -1, -1), source[None].expand(n, -1)
    for target, label in zip(targets, labels):
        tgt = target[None].expand(n, -1)
        for method in methods:
            if method == "invert":
                s = 1.0 if strength is None else strength
                out = edit_by_inversion(parts, images, src, tgt, settings, strength=s, iters=iters)
            elif method == "sdedit":
                s = 0.6 if strength is None else strength
                out = sdedit(parts, images, tgt, settings, strength=s)
            else:
                raise ConfigError(f"unknown edit method '{method}'; choose from {', '.join(METHODS)}")
            rows.append(torch.cat([image[None].to(out), out.float()]))
            captions.append(f"{method} (strength {s:g}): original, then {label}")
    return rows, captions
