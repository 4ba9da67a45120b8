"""Guidance wrappers: plain k-diffusion models around a denoiser, so every sampler works with them.

``CFGDenoiser`` (classifier-free guidance), ``ComposedGuidanceDenoiser`` (weighted per-term guidance) and ``HeadGuidedDenoiser`` (classifier guidance with the
bottleneck head) compose: CFG batches the conditional and unconditional branches together and repeats
every per-sample extra argument (the head's target included) for both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.heads import BottleneckAttrs


class CFGDenoiser(nn.Module):
    """Classifier-free guidance as a k-diffusion model: ``uncond + scale * (cond - uncond)``.

    Both branches run in one batched forward; the unconditional input is the conditioner's dropped
    condition (``conditioner.unconditional``), passed as ``uncond`` [dim] or [B, dim]. Other tensor
    arguments with one row per sample (e.g. ``head_target``) are repeated for the two branches.

    A non-empty ``interval`` ``(lo, hi)`` guides only where ``lo < sigma <= hi`` (guidance in a limited interval,
    Kynkäänniemi et al. 2024) and returns the plain conditional output elsewhere, in one forward of the conditional
    branch; ``()`` guides at every sigma.
    """

    def __init__(self, model: nn.Module, scale: float, uncond: torch.Tensor, cond_key: str = "mapping_cond",
                 interval: tuple = ()):
        super().__init__()
        self.model, self.scale, self.cond_key, self.interval = model, scale, cond_key, interval
        self.register_buffer("uncond", uncond, persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        inside = None
        if self.interval:
            inside = (sigma > self.interval[0]) & (sigma <= self.interval[1])
            if not inside.any():
                return self.model(x, sigma, **kwargs)
        cond = kwargs.pop(self.cond_key)
        uncond = self.uncond.to(cond).expand_as(cond)
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim and len(v) == len(x) else v
                   for k, v in kwargs.items()}
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), **{self.cond_key: torch.cat([uncond, cond])}, **doubled)
        out_uncond, out_cond = both.chunk(2)
        guided = out_uncond + (out_cond - out_uncond) * self.scale
        if inside is None or inside.all():
            return guided
        return torch.where(inside.view(-1, *[1] * (x.ndim - 1)), guided, out_cond)


class ComposedGuidanceDenoiser(nn.Module):
    """Composed guidance as a k-diffusion model: ``D = D_null + sum_t w_t (D_t - D_null)``.

    The Composable Diffusion / CoInD form (Liu et al. 2022; CoInD, ICLR 2025). ``kwargs[cond_key]`` holds
    one condition per term, [B, T, dim] (for gmm_attrs: each term specifies its own attributes and leaves
    the rest unspecified, so the model needs attr_dropout > 0); ``uncond`` is the null condition. Negative
    weights push away from a term. All 1 + T terms run in one batched forward. With one term of weight s
    it is classifier-free guidance at scale s.
    """

    def __init__(self, model: nn.Module, weights, uncond: torch.Tensor, cond_key: str = "mapping_cond"):
        super().__init__()
        self.model, self.cond_key = model, cond_key
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32).flatten(), persistent=False)
        self.register_buffer("uncond", uncond, persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        conds = kwargs.pop(self.cond_key)
        b, terms = conds.shape[:2]
        if terms != len(self.weights):
            raise ValueError(f"{terms} conditions per sample but {len(self.weights)} weights")
        null = self.uncond.to(conds).expand(b, *conds.shape[2:])
        cond = torch.cat([null, *conds.unbind(1)])  # [(1 + T) B, dim], term-major
        reps = 1 + terms
        extra = {k: v.repeat(reps, *([1] * (v.ndim - 1))) if torch.is_tensor(v) and v.ndim and len(v) == b else v
                 for k, v in kwargs.items()}
        out = self.model(x.repeat(reps, *([1] * (x.ndim - 1))), sigma.repeat(reps), **{self.cond_key: cond}, **extra)
        d_null, *d_terms = out.chunk(reps)
        w = self.weights.to(out)
        return d_null + sum(w[t] * (d_terms[t] - d_null) for t in range(terms))


def head_log_prob(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return log p_head(A = target | x) = sum_k log q_k^A_k (1 - q_k)^(1 - A_k), per sample."""
    logp = target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)
    return (logp if mask is None else logp * mask).sum(-1)


class HeadGuidedDenoiser(nn.Module):
    """Guide any k-diffusion sampler with the head: ``denoised + scale * sigma^2 * grad_x log p_head(A | x)``.

    Classifier guidance (Dhariwal & Nichol 2021) with the bottleneck head as the classifier. The target
    attributes come from ``target`` or the ``head_target`` entry of ``extra_args``; ``only_present``
    guides toward the requested attributes without pushing the others to be absent.
    """

    def __init__(self, denoiser: nn.Module, head: BottleneckAttrs, scale: float, target: torch.Tensor | None = None,
                 only_present: bool = False):
        super().__init__()
        self.denoiser, self.head, self.scale, self.only_present = denoiser, head, scale, only_present
        self.target = target

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        target = kwargs.pop("head_target", self.target)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            denoised = self.denoiser(x_in, sigma, **kwargs)
            target = target.to(x).expand(len(x), -1)
            logp = head_log_prob(self.head(), target, target if self.only_present else None)
            grad = torch.autograd.grad(logp.sum(), x_in)[0]
        sigma2 = (sigma ** 2).view(-1, *([1] * (x.ndim - 1)))
        return denoised.detach() + self.scale * sigma2 * grad
