"""Negative Gaussian Mixture Gradient (Lu et al. Sec. 4, Eqs. 11-18), pinned as in DESIGN.md.

pi_hat is the current (predicted) distribution over positions mu, pi the target.
L = min(pi_hat - pi, 0) (deficits, Eq. 11); M_ji = phi(mu_j; mu_i, sigma), M_jj = 0 (Eq. 14);
NGMG(L) = M @ L, every entry in [-max(M), 0]. NGMG is a gradient field: never differentiated through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gmm import normal_pdf, w1_expansion
from ..registry import LOSSES


def kernel_matrix(means: torch.Tensor, sigma: float, *, keep_diagonal: bool = False, normalise: bool = False) -> torch.Tensor:
    """Return M_ji = phi(mu_j; mu_i, sigma) (Eq. 14), zero diagonal unless ``keep_diagonal``.

    ``normalise`` scales every row to sum to 1 (an option for Algorithm 1, not the paper's kernel).
    """
    M = normal_pdf(means[:, None], means[None, :], sigma)
    if not keep_diagonal:
        M = M - torch.diag_embed(torch.diagonal(M))
    if normalise:
        M = M / M.sum(-1, keepdim=True)
    return M


def deficit(pi_hat: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Return L = min(pi_hat - pi, 0), the deficits (Eq. 11)."""
    return (pi_hat - pi).clamp(max=0)


@torch.no_grad()
def ngmg(L: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Return NGMG(L) = M @ L over the last axis (Eqs. 12-14); computed without autograd."""
    return torch.einsum("ji,...i->...j", kernel.to(L), L)


@dataclass
class DensityLearning:
    """The trajectory of Algorithm 1: distributions and W1 to the target, one entry per step (0 = start)."""

    pi_hats: list[torch.Tensor]
    w1: list[float]
    max_deficit: list[float]

    @property
    def monotone(self) -> bool:
        """Whether W1 never rose from one step to the next."""
        return all(b <= a + 1e-12 for a, b in zip(self.w1, self.w1[1:]))


def density_learning(
    pi_hat: torch.Tensor,  # Start distribution over the means.
    pi: torch.Tensor,  # Target distribution.
    means: torch.Tensor,  # Positions mu of the bins.
    *,
    kernel_sigma: float,  # Sigma of the NGMG kernel (Eq. 14).
    lr: float = 0.03,  # Step size.
    steps: int = 10,  # Maximum iterations.
    eps: float = 1e-4,  # Stop when max |L| < eps.
    w1_sigma: float | None = None,  # Expansion sigma for the W1 read-out; default kernel_sigma.
    keep_diagonal: bool = False,  # False is the paper's kernel.
    normalise: bool = False,  # Normalise kernel rows (pairs with keep_diagonal).
) -> DensityLearning:
    """Run Algorithm 1: pi_hat <- normalise(clip_0(pi_hat - lr * NGMG(L))) until max |L| < eps."""
    M = kernel_matrix(means, kernel_sigma, keep_diagonal=keep_diagonal, normalise=normalise)
    w1_sigma = kernel_sigma if w1_sigma is None else w1_sigma
    pi_hat = pi_hat.double() / pi_hat.sum()
    out = DensityLearning([pi_hat], [w1_expansion(pi_hat, pi, means, w1_sigma).item()], [])
    for _ in range(steps):
        L = deficit(pi_hat, pi)
        out.max_deficit.append(L.abs().max().item())
        if out.max_deficit[-1] < eps:
            break
        pi_hat = (pi_hat - lr * ngmg(L, M)).clamp(min=0)
        pi_hat = pi_hat / pi_hat.sum()
        out.pi_hats.append(pi_hat)
        out.w1.append(w1_expansion(pi_hat, pi, means, w1_sigma).item())
    return out


def ngmg_entropy_weights(p: torch.Tensor, target: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Return the detached NGMG weights w = M @ min(p - target, 0) for distributions over the last axis."""
    return ngmg(deficit(p.detach(), target), kernel)


def binary_kernel(sigma: float = 1.0) -> torch.Tensor:
    """Kernel of a binary attribute seen as 2 bins at positions (0, 1)."""
    return kernel_matrix(torch.tensor([0.0, 1.0], dtype=torch.float64), sigma)


@LOSSES.register("ngmg_entropy")
def ngmg_entropy(logits: torch.Tensor, targets: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """NGMG entropy (Eq. 18) for K binary attributes; returns the per-sample loss [B].

    Attribute k is two bins at (0, 1): prediction (q, 1 - q) with q = sigmoid(logit), target (y, 1 - y).
    loss = -sum_bins w * log p with w = NGMG of the deficits, detached. The value is <= 0 and rises to 0
    at the target; its gradient in q has the constant magnitude phi(1; 0, sigma) wherever q != y, like
    the gradient of W1 = |q - y| (the paper's "NGMG shares Wasserstein's benefit"). Log-probabilities come from logsigmoid, so no log(0) appears.
    """
    q = torch.sigmoid(logits)
    p = torch.stack([q, 1 - q], -1)
    y = torch.stack([targets, 1 - targets], -1).to(p)
    w = ngmg_entropy_weights(p, y, binary_kernel(sigma))
    log_p = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], -1)
    return -(w * log_p).sum((-1, -2))


def ngmg_entropy_categorical(logits: torch.Tensor, targets: torch.Tensor, means: torch.Tensor | None = None, sigma: float = 1.0) -> torch.Tensor:
    """NGMG entropy for one categorical variable over n bins at positions ``means`` (default 0..n-1).

    With the paper's zero diagonal, a deficit bin gets no weight itself: the loss lowers the
    probability of the bins near a deficit (in proportion to the kernel), which the softmax hands on
    to every other bin, the deficit among them; bins far from every deficit feel almost no pull.
    """
    n = logits.shape[-1]
    means = torch.arange(n, dtype=torch.float64) if means is None else means
    log_p = F.log_softmax(logits, -1)
    w = ngmg_entropy_weights(log_p.exp(), targets.to(log_p), kernel_matrix(means, sigma))
    return -(w * log_p).sum(-1)


@LOSSES.register("bce")
def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over attributes; per-sample loss [B]."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits), reduction="none").sum(-1)
