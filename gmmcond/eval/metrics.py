"""Distances between sets of features: Frechet distance, KID, precision/recall/density/coverage, nuisance fidelity.

Precision and recall follow Kynkaanniemi et al. 2019 (k-NN manifolds, k = 3 by default); density and
coverage follow Naeem et al. 2020 (k = 5). k-NN radii exclude the point itself and ties count as inside
(``<=``), so two identical sets score 1. ``tests/test_metrics.py`` checks them against the ``prdc``
package on continuous data, where ties do not occur.
"""
from __future__ import annotations

import k_diffusion as K
import numpy as np
import torch
from scipy import stats


def knn_radii(x: torch.Tensor, k: int, *more: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Return each row's distance to its k-th nearest other row (itself excluded); with ``more`` k's, a tuple of
    the radii for each, from one distance matrix."""
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    ks = (k, *more)
    nearest = d.topk(max(ks), dim=1, largest=False).values  # ascending: column j - 1 is the j-th nearest
    radii = tuple(nearest[:, j - 1].contiguous() for j in ks)
    return radii if more else radii[0]


def prdc(real: torch.Tensor, fake: torch.Tensor, *, k_pr: int = 3, k_dc: int = 5) -> dict[str, float]:
    """Return precision, recall (k = ``k_pr``), density and coverage (k = ``k_dc``) of ``fake`` against ``real``."""
    if min(len(real), len(fake)) <= max(k_pr, k_dc):
        raise ValueError(f"prdc needs more than {max(k_pr, k_dc)} rows per set, got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    d = torch.cdist(real, fake)  # [n_real, n_fake]
    (r_real, r_real5), r_fake = knn_radii(real, k_pr, k_dc), knn_radii(fake, k_pr)
    precision = (d <= r_real[:, None]).any(0).double().mean().item()
    recall = (d <= r_fake[None, :]).any(1).double().mean().item()
    inside = d <= r_real5[:, None]
    density = inside.sum(0).double().mean().item() / k_dc
    coverage = (d.min(1).values <= r_real5).double().mean().item()
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two feature sets (k-diffusion's implementation)."""
    return K.evaluation.fid(a.float(), b.float()).item()


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID (unbiased polynomial-kernel MMD^2, k-diffusion's implementation): meaningful at small n."""
    return K.evaluation.kid(a.float(), b.float()).item()


def set_metrics(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FD, KID and PRDC of ``fake`` against ``real``."""
    return {"fd": frechet_distance(real, fake), "kid": kernel_inception_distance(real, fake),
            **prdc(real, fake)}


def nuisance_fidelity(real: np.ndarray, fake: np.ndarray, names) -> dict[str, dict[str, float]]:
    """Per nuisance: W1 between fake and real values and the spread ratio std(fake) / std(real)."""
    out = {}
    for j, name in enumerate(names):
        r, f = real[:, j], fake[:, j]
        out[name] = {"w1": float(stats.wasserstein_distance(r, f)),
                     "spread_ratio": float(f.std() / r.std()) if r.std() > 0 else float("nan")}
    return out


def nearest(x: torch.Tensor, y: torch.Tensor, chunk: int = 512, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x``'s Euclidean distance to its nearest row of ``y`` and that row's index, in chunks
    (``exclude[i]``: a row of ``y`` row i of ``x`` may not pick, e.g. itself)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    dist, index = [], []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], y)
        if exclude is not None:
            rows = torch.arange(len(d))
            d[rows, exclude[start:start + chunk]] = float("inf")
        best = d.min(1)
        dist.append(best.values)
        index.append(best.indices)
    return torch.cat(dist), torch.cat(index)


def authenticity(fake: torch.Tensor, train: torch.Tensor) -> dict:
    """Authenticity (Alaa et al. 2022, "How faithful is your synthetic data?"; dgm-eval's AuthPct): a sample is
    unauthentic when it lies closer to its nearest training image than that image lies to any other training image.

    Returns ``auth_pct`` (percent authentic), the per-sample nearest training index and distance, and the
    median distance.
    """
    d, j = nearest(fake, train)
    chosen = torch.unique(j)
    d_train, _ = nearest(train[chosen], train, exclude=chosen)
    own = torch.empty(len(train), dtype=torch.float64)
    own[chosen] = d_train
    authentic = d > own[j]
    return {"auth_pct": 100 * authentic.double().mean().item(), "nearest_index": j, "nearest_distance": d,
            "median_distance": d.median().item()}
