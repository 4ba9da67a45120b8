"""An exact testbed: a Gaussian mixture in d dimensions with its closed-form denoiser.

For x = x0 + sigma * eps with x0 ~ sum_c w_c N(m_c, s_c^2 I), component c gives x ~ N(m_c, (s_c^2 + sigma^2) I),
posterior r_c(x) proportional to w_c N(x; m_c, (s_c^2 + sigma^2) I), and
E[x0 | x] = sum_c r_c (m_c + s_c^2 / (s_c^2 + sigma^2) (x - m_c)). The denoiser is a k-diffusion model:
``model(x, sigma, class_weights=None)``; ``class_weights`` [B, C] re-weights the components (one-hot =
condition on a component; the prior weights = unconditional), so CFGDenoiser works on it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class GaussianMixtureDenoiser(nn.Module):
    """The exact posterior-mean denoiser of an isotropic Gaussian mixture."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("means", means.double())  # [C, d]
        self.register_buffer("stds", stds.double())  # [C]
        self.register_buffer("weights", (weights / weights.sum()).double())  # [C]

    @classmethod
    def default(cls, d: int = 2) -> "GaussianMixtureDenoiser":
        """Three unequal, well separated modes of unequal spread (weights 0.5, 0.3, 0.2)."""
        means = torch.zeros(3, d, dtype=torch.float64)
        means[0, 0], means[1, 0], means[2, min(1, d - 1)] = -2.0, 2.0, 2.5
        return cls(means, torch.tensor([0.3, 0.5, 0.4]), torch.tensor([0.5, 0.3, 0.2]))

    def log_posterior(self, x: torch.Tensor, sigma: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Return log r_c(x) [B, C], the component posterior at noise level sigma."""
        x, d = x.double(), x.shape[-1]
        var = self.stds ** 2 + sigma.double().view(-1, 1) ** 2  # [B, C]
        sq = ((x[:, None, :] - self.means) ** 2).sum(-1)  # [B, C]
        w = self.weights if class_weights is None else class_weights.double()
        logits = torch.log(w.clamp_min(1e-300)) - 0.5 * sq / var - 0.5 * d * torch.log(var)
        return logits.log_softmax(-1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        r = self.log_posterior(x, sigma, class_weights).exp()  # [B, C]
        shrink = self.stds ** 2 / (self.stds ** 2 + sigma.double().view(-1, 1) ** 2)  # [B, C]
        per_comp = self.means + shrink[..., None] * (x.double()[:, None, :] - self.means)  # [B, C, d]
        return (r[..., None] * per_comp).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, component: int | None = None) -> torch.Tensor:
        """Draw ``n`` exact samples of x0 (of one component if given)."""
        if component is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            comp = torch.full((n,), component, dtype=torch.long)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * eps

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Return each point's most probable component under the clean mixture."""
        return self.log_posterior(x, torch.zeros(len(x))).argmax(-1)

    def mode_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the fraction of points per mode and the within-mode std (per dimension) of each mode."""
        comp = self.assign(x)
        weights = torch.bincount(comp, minlength=len(self.weights)).double() / len(x)
        spread = torch.stack([(x[comp == c].double() - self.means[c]).pow(2).mean().sqrt() if (comp == c).any()
                              else torch.tensor(float("nan"), dtype=torch.float64) for c in range(len(self.weights))])
        return weights, spread


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W1 between two equal-size point sets, over fixed random directions."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ dirs).sort(0)
    pb, _ = (b.double() @ dirs).sort(0)
    return (pa - pb).abs().mean().item()
