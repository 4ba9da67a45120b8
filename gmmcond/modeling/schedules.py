"""Noise schedules in k-diffusion's sigma space: a training density over sigma and sampling sigmas.

A VP schedule (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps) maps to sigma space by
sigma_t = sqrt((1 - abar_t) / abar_t), since x_t / sqrt(abar_t) = x0 + sigma_t eps.
"""
from __future__ import annotations

import math

import torch
from k_diffusion import sampling as ks

from ..errors import ConfigError
from ..registry import SCHEDULES

TILTS = ("none", "soft_min_snr")


@SCHEDULES.register("karras")
class KarrasSchedule:
    """Karras et al. (2022): log-normal training density, ``get_sigmas_karras`` for sampling."""

    def __init__(
        self,
        *,
        sigma_min: float = 0.01,  # Lowest sampling sigma.
        sigma_max: float = 80.0,  # Highest sampling sigma (pure noise for data in [-1, 1]).
        rho: float = 7.0,  # Karras et al. Eq. 5 spacing.
        loc: float = -1.2,  # Mean of log sigma during training (EDM's P_mean).
        scale: float = 1.2,  # Std of log sigma during training (EDM's P_std).
        tilt: str = "none",  # none | soft_min_snr: draw sigma from the log-normal times this weighting (pair with denoiser.loss=karras).
        tilt_sigma_data: float = 0.5,  # The sigma_data of the tilting weighting; must equal denoiser.sigma_data.
    ):
        if tilt not in TILTS:
            raise ConfigError(f"schedule.tilt must be one of {', '.join(TILTS)}, got {tilt!r}")
        self.sigma_min, self.sigma_max, self.rho, self.loc, self.scale = sigma_min, sigma_max, rho, loc, scale
        self.tilt, self.tilt_sigma_data = tilt, tilt_sigma_data

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` training sigmas from the log-normal density, or from it tilted by ``tilt``.

        The soft-min-SNR tilt draws from p(sigma) w(sigma) / Z, where p is the log-normal and
        w = (sigma s)^2 / (sigma^2 + s^2)^2 = 1 / (4 cosh^2(log(sigma / s))) with s = ``tilt_sigma_data``
        (k-diffusion's soft-min-SNR weighting): rejection sampling from p, accepting with probability
        4 w = sech^2(log(sigma / s)) <= 1. Trained with unit weight (``denoiser.loss=karras``), the expected
        loss is the soft-min-SNR objective divided by Z, but no sample in a batch is spent on a near-zero
        weight: importance sampling of the same objective, with lower gradient variance.

        Measured on the shapes recipe it trains far worse than the weighting it stands in for (launch/figures/RESULTS.md, "The
        default recipe": conformity 0.33 against 0.84 at equal steps). A likely reason, not isolated: the two are equal in expectation only
        for plain SGD: AdamW normalises each parameter's update, so under the weighting the rarely weighted
        noise levels (the high sigmas where composition is decided) still move the parameters that serve
        them, while the tilt almost never draws them."""
        if self.tilt == "none":
            return (self.loc + self.scale * torch.randn(n, generator=generator)).exp()
        kept, need = [], n
        while need:
            u = self.loc + self.scale * torch.randn(2 * need + 8, generator=generator)
            accept = torch.rand(len(u), generator=generator) < torch.cosh(u - math.log(self.tilt_sigma_data)).pow(-2)
            kept.append(u[accept][:need])
            need -= len(kept[-1])
        return torch.cat(kept).exp()

    def sigmas(self, steps: int) -> torch.Tensor:
        """Return ``steps`` sampling sigmas from sigma_max to sigma_min, then 0."""
        return ks.get_sigmas_karras(steps, self.sigma_min, self.sigma_max, self.rho)


class DiscreteVPSchedule:
    """A discrete VP schedule: training draws t uniformly from 1..T; sampling walks the sigmas down to 0."""

    def __init__(self, betas: torch.Tensor):
        self.T = len(betas)
        self.all_sigmas = vp_sigma(torch.cumprod(1 - betas.double(), 0)).float()  # sigma_t for t = 1..T
        self.sigma_min, self.sigma_max = self.all_sigmas[0].item(), self.all_sigmas[-1].item()

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` training sigmas: sigma_t with t uniform on 1..T."""
        return self.all_sigmas[torch.randint(0, self.T, (n,), generator=generator)]

    def sigmas(self, steps: int) -> torch.Tensor:
        """Return ``steps`` of the discrete sigmas, evenly spaced in t from T down to 1, then 0."""
        t = torch.linspace(self.T - 1, 0, min(steps, self.T)).round().long()
        return ks.append_zero(self.all_sigmas[t])


@SCHEDULES.register("vp_constant")
class VPConstantSchedule(DiscreteVPSchedule):
    """The paper's CelebA schedule: T steps of one constant beta."""

    def __init__(self, *, T: int = 100, beta: float = 0.05):  # beta=0.05, T=100: abar_T = 0.006, sigma_T = 12.9
        super().__init__(torch.full((T,), beta))


@SCHEDULES.register("vp_linear")
class VPLinearSchedule(DiscreteVPSchedule):
    """DDPM's linear schedule (Ho et al. 2020), the paper's CIFAR-10 setting."""

    def __init__(self, *, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(torch.linspace(beta_start, beta_end, T))


def vp_sigma(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Convert VP abar_t to k-diffusion's sigma_t = sqrt((1 - abar_t) / abar_t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

