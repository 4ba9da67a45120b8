"""The training objective, kept apart from the training loop (as EDM keeps its losses apart from its loop): what a
step minimises, given a batch, its noise and its noise levels."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .build import Components


def immiscible_noise(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Immiscible Diffusion (Li et al. 2024): the batch's noise draws reordered so that the total squared distance
    between each image and its noise is least (a linear assignment, scipy's Hungarian solver), so each image is
    noised towards the draws nearest it; every draw is still used once, so the batch's noise stays Gaussian."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(images.flatten(1).double(), noise.flatten(1).double()).pow(2)
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


class TrainingObjective(nn.Module):
    """The training objective, the module accelerate wraps: conditioner + Denoiser (+ head), returning per-sample
    losses: the diffusion loss (the Denoiser's weighting), the head's weighted loss and CoInD's penalty.

    ``coind_weight`` > 0 adds CoInD's independence penalty (Gaudi et al. 2025) on the first ``coind_fraction``
    of each batch: for one unit i per sample (an attribute, or with ``coind_unit`` "group" a whole mutually
    exclusive group, as CoInD's authors pick one label column), (D(x; y, i unspecified) + D(x; i alone) - D(x; nothing
    specified) - D(x; y))^2, averaged over pixels, so the model's joint composes from its marginals. In
    ``coind_space`` "noise" the same gap is taken between noise predictions, (x - D) / sigma, as the authors train
    (their model predicts the noise): the denoised gap over sigma squared, which weighs low noise levels far more.
    """

    def __init__(self, parts: Components, coind_weight: float = 0.0, coind_fraction: float = 0.25,
                 coind_space: str = "denoised", coind_unit: str = "attribute"):
        super().__init__()
        self.conditioner, self.denoiser, self.head = parts.conditioner, parts.denoiser, parts.head
        if coind_weight and not self.conditioner.partial:
            raise ConfigError("train.coind_weight > 0 compares conditions with attributes left unspecified, which needs "
                              "conditioner.attr_dropout > 0 (e.g. the shapes_compose recipe)")
        if not 0 < coind_fraction <= 1:
            raise ConfigError(f"train.coind_fraction must be in (0, 1], got {coind_fraction}")
        if coind_space not in ("denoised", "noise"):
            raise ConfigError(f"train.coind_space must be denoised or noise, got {coind_space!r}")
        if coind_unit not in ("attribute", "group"):
            raise ConfigError(f"train.coind_unit must be attribute or group, got {coind_unit!r}")
        self.coind_weight, self.coind_fraction = coind_weight, coind_fraction
        self.coind_space, self.coind_unit = coind_space, coind_unit

    def forward(self, images, attrs, index, noise, sigma) -> dict[str, torch.Tensor]:
        cond = self.conditioner(attrs, index)
        kwargs = {} if cond is None else {"mapping_cond": cond}
        diffusion = self.denoiser.loss(images, noise, sigma, **kwargs).float()
        out = {"loss": diffusion, "diffusion": diffusion}
        if self.head is not None:
            out.update({k: v.float() for k, v in self.head.losses(attrs).items()})
            out["loss"] = diffusion + self.head.weight * out["head"]
        if self.coind_weight:
            out["coind"] = self.coind_penalty(images, attrs, index, noise, sigma)
            out["loss"] = out["loss"] + self.coind_weight * out["coind"]
        return out

    def coind_penalty(self, images, attrs, index, noise, sigma) -> torch.Tensor:
        """CoInD's penalty per sample [B] (0 outside the first ``coind_fraction`` of the batch)."""
        b, k = attrs.shape
        m = max(1, math.ceil(self.coind_fraction * b))
        cond = self.conditioner
        z = cond.training_latents(m, index[:m]).to(images)
        units = cond.units if self.coind_unit == "group" else [[j] for j in range(k)]
        pick = torch.zeros(m, k).to(z)  # unit i of each sample
        for row, u in enumerate(torch.randint(0, len(units), (m,)).tolist()):
            pick[row, units[u]] = 1
        a = attrs[:m].to(z)
        ones = torch.ones_like(a)
        conds = torch.cat([cond.encode(a, z, known=ones - pick), cond.encode(a, z, known=pick),
                           cond.all_unknown(m).to(z), cond.encode(a, z, known=ones)])
        noised = (images[:m] + noise[:m] * sigma[:m, None, None, None]).repeat(4, 1, 1, 1)
        d = self.denoiser(noised, sigma[:m].repeat(4), mapping_cond=conds).float().view(4, m, -1)
        gap = (d[0] + d[1] - d[2] - d[3]).pow(2).mean(-1)
        if self.coind_space == "noise":  # eps = (x - D) / sigma: the x terms cancel, the gap scales by -1 / sigma
            gap = gap / sigma[:m].float().pow(2)
        return torch.cat([gap, gap.new_zeros(b - m)])
