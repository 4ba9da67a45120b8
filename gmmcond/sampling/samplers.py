"""Samplers with k-diffusion's signature, so they drop into any k-diffusion model.

Every ``k_diffusion.sampling.sample_*`` is registered in SAMPLERS by its short name (``euler``,
``dpmpp_2m``, ...), next to the paper's ``x0_reproject``.
"""
from __future__ import annotations

import inspect
import math

import torch
from k_diffusion import sampling as ks
from tqdm.auto import trange

from ..registry import SAMPLERS


@SAMPLERS.register("x0_reproject")
@torch.no_grad()
def sample_x0_reproject(model, x, sigmas, extra_args=None, callback=None, disable=None, renoise=1., noise_sampler=None):
    """Sample by x0-reprojection (Lu et al. Eq. 10): predict x0, then noise it to the next sigma.

    ``x = denoised + sigma_next * (sqrt(1 - r^2) * eps_hat + r * z)`` with eps_hat = (x - denoised) / sigma
    and z fresh noise. r = 1 is the paper's sampler (equal to ``sample_euler_ancestral`` with a huge eta);
    r = 0 is DDIM (equal to ``sample_euler``).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = ks.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    keep = math.sqrt(max(0.0, 1 - renoise ** 2))
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        noise = (x - denoised) / sigmas[i] * keep if keep else torch.zeros_like(x)
        if renoise:
            noise = noise + renoise * noise_sampler(sigmas[i], sigmas[i + 1])
        x = denoised + sigmas[i + 1] * noise
    return x


def _range_adapter(fn):
    """Adapt a k-diffusion sampler taking (sigma_min, sigma_max, n) to the common sigmas signature."""

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **kwargs):
        sigma_min = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
        return fn(model, x, float(sigma_min), float(sigmas[0]), len(sigmas) - 1, extra_args=extra_args,
                  callback=callback, disable=disable, noise_sampler=noise_sampler, **kwargs)

    sampler.__doc__ = fn.__doc__
    sampler.__wrapped_sampler__ = fn
    return sampler


def _register_k_diffusion_samplers() -> None:
    for name in sorted(dir(ks)):
        if not name.startswith("sample_"):
            continue
        fn = getattr(ks, name)
        if name == "sample_dpm_fast":
            fn = _range_adapter(fn)
        elif name == "sample_dpm_adaptive":
            fn = _range_adapter(lambda model, x, lo, hi, n, **kw: ks.sample_dpm_adaptive(model, x, lo, hi, **kw))
        SAMPLERS.register(name[len("sample_"):], fn)


_register_k_diffusion_samplers()


def sample(sampler: dict | str, model, noise: torch.Tensor, sigmas: torch.Tensor, extra_args=None, callback=None,
           disable=True, generator: torch.Generator | None = None, init: torch.Tensor | None = None):
    """Run a SAMPLERS node (a key or ``{type, **options}``) from ``init + noise * sigmas[0]`` (init 0 by default;
    images there start SDEdit from a partly noised image).

    With ``generator``, stochastic samplers that take a ``noise_sampler`` draw their fresh noise from it, and
    those that call ``torch.randn_like`` themselves (k-diffusion's euler, heun and dpm_2 draw their churn noise
    so, even at ``s_churn=0``) draw from the global stream reseeded with the generator's seed inside
    ``fork_rng``: a seeded call gives the same images every time and leaves the caller's RNG as it was (a
    training grid must not move the training's noise stream).
    """
    node = {"type": sampler} if isinstance(sampler, str) else dict(sampler)
    fn = SAMPLERS.get(node.pop("type"))
    x = noise * sigmas[0] if init is None else init + noise * sigmas[0]
    if generator is None:
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **node)
    if "noise_sampler" in inspect.signature(fn).parameters:
        node.setdefault("noise_sampler", lambda s, t: torch.randn(noise.shape, generator=generator).to(noise))
    with torch.random.fork_rng(devices=[noise.device] if noise.is_cuda else []):  # restored on exit
        torch.random.default_generator.manual_seed(generator.initial_seed())
        if noise.is_cuda:
            with torch.cuda.device(noise.device):
                torch.cuda.manual_seed(generator.initial_seed())
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **node)
