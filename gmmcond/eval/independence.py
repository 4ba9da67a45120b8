"""CoInD's JSD diagnostic (Gaudi et al., ICLR 2025): does the model's implied joint over two attributes factor?

A conditional diffusion model implies a classifier: log p(c | x) = -(its denoising error under condition c)
+ const (Li et al. 2023, "Your diffusion model is secretly a zero-shot classifier"). For attributes i and j,
the implied joint over their four value combinations (both specified, the rest unspecified) is compared with
the product of the implied marginals (i alone, then j alone, specified). A model whose attributes compose
scores about 0; one that learned them only together does not. The error is the Gaussian log-likelihood of
the noising step, -1/2 ||(D(x_sigma; c) - x) / sigma||^2 summed over pixels, averaged over a few mid noise
levels with the same noise for every condition (common random numbers), so the comparison is paired.
"""
from __future__ import annotations

import torch


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between distributions along ``dim``."""
    m = (p + q) / 2

    def kl(a):
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(dim)

    return (kl(p) + kl(q)) / 2


def factorisation_gap(joint_logits: torch.Tensor, logits_i: torch.Tensor, logits_j: torch.Tensor) -> torch.Tensor:
    """JSD between softmax(joint) over the 4 combinations [4, B] (order (0,0), (0,1), (1,0), (1,1)) and the
    product of softmax(logits_i) [2, B] and softmax(logits_j) [2, B]; one value per image [B]."""
    joint = joint_logits.double().softmax(0)
    product = (logits_i.double().softmax(0)[:, None] * logits_j.double().softmax(0)[None]).reshape(4, -1)
    return js_divergence(joint, product)


@torch.no_grad()
def implied_logits(parts, images: torch.Tensor, values: torch.Tensor, known: torch.Tensor,
                   sigmas=(0.3, 0.6, 1.2), seed: int = 0) -> torch.Tensor:
    """-1/2 ||(D(x_sigma; c) - x) / sigma||^2 per candidate condition and image, averaged over ``sigmas``:
    ``values`` and ``known`` are [C, K] (candidate c specifies ``known[c]`` with ``values[c]``); returns [C, B]."""
    device = next(parts.denoiser.parameters()).device
    cond = parts.conditioner
    gen = torch.Generator().manual_seed(seed)
    x = images.to(device)
    n = len(x)
    z = cond.sample_latents(n, gen).to(device)
    out = torch.zeros(len(values), n, dtype=torch.float64)
    for s in sigmas:
        noised = x + s * torch.randn(x.shape, generator=gen).to(device)
        sigma = torch.full((n,), float(s), device=device)
        for c in range(len(values)):
            mc = cond.encode(values[c].expand(n, -1).to(device), z, known=known[c].expand(n, -1).to(device))
            d = parts.denoiser(noised, sigma, mapping_cond=mc).float()
            out[c] += (-0.5 * ((d - x) / s).pow(2).flatten(1).sum(1)).double().cpu() / len(sigmas)
    return out


def jsd_diagnostic(parts, images: torch.Tensor, i: int, j: int, *, sigmas=(0.3, 0.6, 1.2), seed: int = 0) -> dict:
    """CoInD's JSD for attributes ``i`` and ``j`` on ``images`` (needs a run trained with attr_dropout > 0):
    the mean and per-image values of :func:`factorisation_gap`."""
    k = len(parts.attr_names)
    combos = [(a, b) for a in (0.0, 1.0) for b in (0.0, 1.0)]
    values = torch.zeros(8, k)
    known = torch.zeros(8, k)
    for c, (a, b) in enumerate(combos):
        values[c, i], values[c, j], known[c, [i, j]] = a, b, 1.0
    for c, a in enumerate((0.0, 1.0)):
        values[4 + c, i], known[4 + c, i] = a, 1.0
        values[6 + c, j], known[6 + c, j] = a, 1.0
    logits = implied_logits(parts, images, values, known, sigmas=sigmas, seed=seed)
    gap = factorisation_gap(logits[:4], logits[4:6], logits[6:8])
    return {"jsd": gap.mean().item(), "per_image": gap.tolist()}
