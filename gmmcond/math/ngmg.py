"""Negative Gaussian Mixture Gradient (Lu et al. Sec. 4, Eqs. 11-18).

pi_hat is the current (predicted) distribution over positions mu, pi the target; M_ji = phi(mu_j; mu_i,
sigma) with M_jj = 0 (Eq. 14). The paper is not self-consistent about the argument order of L, so two
readings are kept (``form``):

* ``"surplus"`` (default; Eqs. 14 and 18 as printed, target first): L = min(pi - pi_hat, 0), the
  prediction's surplus, and NGMG = -M L >= 0. NGMG entropy then raises the target bin; for a binary
  attribute it equals phi(1; 0, sigma) * |q - y| * BCE with |q - y| detached: phi times a focal loss
  with gamma 1 (Lin et al. 2017).
* ``"deficit"`` (Eq. 11's order and the stated bounds): L = min(pi_hat - pi, 0), NGMG = M L in
  [-max(M), 0]. NGMG entropy then lowers the bins near a deficit; its logit gradient phi q (1 - q)
  vanishes for a confident wrong prediction.

NGMG is a gradient field: it is never differentiated through.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gmm import normal_pdf, w1_expansion
from ..errors import ConfigError


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


FORMS = ("surplus", "deficit")


def deficit(pi_hat: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Return L = min(pi_hat - pi, 0), the deficits (Eq. 11 read prediction first)."""
    return (pi_hat - pi).clamp(max=0)


def surplus(pi_hat: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Return L(pi, pi_hat) = min(pi - pi_hat, 0), the surpluses (Eqs. 14/18 and Algorithm 1 as printed)."""
    return (pi - pi_hat).clamp(max=0)


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ConfigError(f"NGMG form must be one of {', '.join(FORMS)}, got '{form}'")


@torch.no_grad()
def ngmg_field(pi_hat: torch.Tensor, pi: torch.Tensor, kernel: torch.Tensor, form: str = "surplus") -> torch.Tensor:
    """Return the NGMG of a form: surplus -M min(pi - pi_hat, 0) >= 0, or deficit M min(pi_hat - pi, 0) <= 0."""
    _check_form(form)
    if form == "surplus":
        return -ngmg(surplus(pi_hat, pi), kernel)
    return ngmg(deficit(pi_hat, pi), kernel)


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
    form: str = "deficit",  # deficit raises bins near a deficit; surplus (as printed) lowers bins near a surplus.
) -> DensityLearning:
    """Run Algorithm 1: pi_hat <- normalise(clip_0(pi_hat - lr * NGMG)) until max |L| < eps."""
    _check_form(form)
    M = kernel_matrix(means, kernel_sigma, keep_diagonal=keep_diagonal, normalise=normalise)
    w1_sigma = kernel_sigma if w1_sigma is None else w1_sigma
    pi_hat = pi_hat.double() / pi_hat.sum()
    out = DensityLearning([pi_hat], [w1_expansion(pi_hat, pi, means, w1_sigma).item()], [])
    for _ in range(steps):
        L = deficit(pi_hat, pi) if form == "deficit" else surplus(pi_hat, pi)
        out.max_deficit.append(L.abs().max().item())
        if out.max_deficit[-1] < eps:
            break
        pi_hat = (pi_hat - lr * ngmg_field(pi_hat, pi, M, form)).clamp(min=0)
        pi_hat = pi_hat / pi_hat.sum()
        out.pi_hats.append(pi_hat)
        out.w1.append(w1_expansion(pi_hat, pi, means, w1_sigma).item())
    return out




def binary_kernel(sigma: float = 1.0) -> torch.Tensor:
    """Kernel of a binary attribute seen as 2 bins at positions (0, 1)."""
    return kernel_matrix(torch.tensor([0.0, 1.0], dtype=torch.float64), sigma)


def ngmg_entropy(logits: torch.Tensor, targets: torch.Tensor, sigma: float = 1.0, form: str = "surplus") -> torch.Tensor:
    """NGMG entropy (Eq. 18) for K binary attributes; returns the per-sample loss [B].

    Attribute k is two bins at (0, 1): prediction (q, 1 - q) with q = sigmoid(logit), target (y, 1 - y);
    loss = -sum_bins NGMG * log p with NGMG (:func:`ngmg_field`) detached. ``surplus`` (default, as
    printed): >= 0, equal to phi(1; 0, sigma) * |q - y| * BCE(q, y), a focal loss with gamma 1.
    ``deficit``: <= 0, its gradient in q has the constant magnitude phi wherever q != y, like that of
    W1 = |q - y|, and it vanishes in logit space for confident wrong predictions. Neither value is a
    distance: monitor mean |q - y| beside it. Log-probabilities come from logsigmoid: no log(0).
    """
    q = torch.sigmoid(logits.detach())
    p = torch.stack([q, 1 - q], -1)
    y = torch.stack([targets, 1 - targets], -1).to(p)
    w = ngmg_field(p, y, binary_kernel(sigma), form)
    log_p = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], -1)
    return -(w.to(log_p) * log_p).sum((-1, -2))


def ngmg_entropy_categorical(logits: torch.Tensor, targets: torch.Tensor, means: torch.Tensor | None = None,
                             sigma: float = 1.0, form: str = "surplus") -> torch.Tensor:
    """NGMG entropy for one categorical variable over n bins at positions ``means`` (default 0..n-1).

    With the paper's zero diagonal a bin never weighs itself. ``surplus``: a surplus bin j puts weight
    |L_j| * M_ij on every other bin i, so the loss raises the bins near a surplus, the target among them
    when it is near; a one-hot target far from the surplus gets little pull (not a clean categorical
    loss). ``deficit``: the loss lowers the bins near a deficit, and the softmax hands their mass on to
    every other bin, the deficit among them.
    """
    n = logits.shape[-1]
    means = torch.arange(n, dtype=torch.float64) if means is None else means
    log_p = F.log_softmax(logits, -1)
    w = ngmg_field(log_p.detach().exp(), targets.to(log_p), kernel_matrix(means, sigma), form)
    return -(w.to(log_p) * log_p).sum(-1)


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over attributes; per-sample loss [B]."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits), reduction="none").sum(-1)
