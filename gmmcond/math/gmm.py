"""GMM expansion (Lu et al. Sec. 2.2) and W1 under expansion (Eq. 4): pure functions on tensors.

A GMM expansion has N components with fixed means evenly spaced on [lo, hi] and one shared sigma;
only the weights pi are learned. phi(x; mu, s) is the normalised normal density N(x; mu, s^2).
"""
from __future__ import annotations

import math

import torch


def normal_pdf(x: torch.Tensor, mu: torch.Tensor | float, sigma: float) -> torch.Tensor:
    """Return phi(x; mu, sigma), the normal density."""
    return torch.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def expansion_means(n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Return ``n`` component means evenly spaced on [lo, hi]."""
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def expansion_fit(x: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """Fit the weights in one iteration: l_n = sum_d phi(x_d; mu_n, sigma), pi_n = l_n / sum l."""
    likelihood = normal_pdf(x.reshape(-1, 1).to(means), means, sigma).sum(0)
    return likelihood / likelihood.sum()


def expansion_pdf(x: torch.Tensor, pi: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return the expansion density sum_n pi_n phi(x; mu_n, sigma) at every x."""
    return (pi * normal_pdf(x[..., None].to(means), means, sigma)).sum(-1)


def expansion_cdf(x: torch.Tensor, pi: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return G(x) = sum_n pi_n Phi((x - mu_n) / sigma)."""
    z = (x[..., None].to(means) - means) / sigma
    return (pi * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)


def expansion_sample(n: int, pi: torch.Tensor, means: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` samples: a component by pi, then its normal."""
    comp = torch.multinomial(pi.double(), n, replacement=True, generator=generator)
    return means[comp] + sigma * torch.randn(n, generator=generator, dtype=means.dtype)


def w1_expansion(pi1: torch.Tensor, pi2: torch.Tensor, means: torch.Tensor, sigma: float, points: int = 20001) -> torch.Tensor:
    """W1 between two expansions on shared means (Eq. 4): integral of |sum_n (pi1_n - pi2_n) F_n(x)| dx.

    Integrated by the trapezoid rule on a grid reaching 10 sigma past the outer means, where the
    component CDFs of the two agree to below float64 precision.
    """
    means = means.double()
    x = torch.linspace(means.min().item() - 10 * sigma, means.max().item() + 10 * sigma, points, dtype=torch.float64)
    diff = expansion_cdf(x, pi1.double(), means, sigma) - expansion_cdf(x, pi2.double(), means, sigma)
    return torch.trapezoid(diff.abs(), x)
