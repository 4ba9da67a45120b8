"""Classifier heads on the U-Net bottleneck (Lu et al. Sec. 3.3, Fig. 8).

The head reads the output of ``u_net.d_blocks[-1]`` of k-diffusion's ``image_v1`` through a forward
hook, so the model's code is untouched and any k-diffusion wrapper (``KarrasAugmentWrapper``,
``Denoiser``) can sit around it. Note that image_v1's AdaGN layers see the mapping condition, so the
bottleneck features carry the requested attributes as well as the noisy image.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ConfigError
from ..math.ngmg import bce, ngmg_entropy
from ..registry import HEADS, LOSSES
from .models import unwrap_inner

LOSSES.register("ngmg_entropy", ngmg_entropy)  # the paper's NGMG entropy (Eq. 18) on binary attributes
LOSSES.register("bce", bce)


@HEADS.register("none")
def no_head(num_attrs: int, channels: int) -> None:
    """No head: plain diffusion training."""
    return None


@HEADS.register("bottleneck_attrs")
class BottleneckAttrs(nn.Module):
    """Predict the K attributes from the bottleneck features of the noisy input."""

    def __init__(
        self,
        num_attrs: int,  # K, injected from the dataset.
        channels: int,  # Bottleneck channels, injected from the model.
        *,
        weight: float = 0.1,  # Total loss = diffusion loss + weight * head loss.
        loss: str = "ngmg_entropy",  # A LOSSES key: ngmg_entropy | bce.
        form: str = "surplus",  # NGMG entropy reading (Eq. 18): surplus (as printed) | deficit; unused by bce.
        hidden: int = 128,  # Width of the MLP after global average pooling.
        detach: bool = False,  # Stop the head's gradient at the bottleneck (False: it trains the encoder).
    ):
        super().__init__()
        self.weight, self.detach, self.loss_name = weight, detach, loss
        self.loss_fn = functools.partial(LOSSES.get(loss), form=form) if loss == "ngmg_entropy" else LOSSES.get(loss)
        self.net = nn.Sequential(
            nn.GroupNorm(1, channels), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, num_attrs),
        )
        self.features: torch.Tensor | None = None

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Forward hook on the bottleneck block: keep its output for the next head call."""
        self.features = output

    def forward(self) -> torch.Tensor:
        """Return logits [B, K] from the features of the last model forward."""
        if self.features is None:
            raise RuntimeError("the head has no features: run the model forward first")
        feats = self.features.detach() if self.detach else self.features
        return self.net(feats)

    def losses(self, attrs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return per-sample head loss, accuracy and mean |q - y| (the monitorable W1) for the last forward."""
        logits = self()
        q = torch.sigmoid(logits.detach())
        return {
            "head": self.loss_fn(logits, attrs),
            "head_acc": ((q > 0.5).float() == attrs).float().mean(-1),
            "head_w1": (q - attrs).abs().mean(-1),
        }


def bottleneck(model: nn.Module) -> nn.Module:
    """Return the U-Net bottleneck block (``u_net.d_blocks[-1]``) under any k-diffusion wrappers."""
    inner = unwrap_inner(model)
    if not hasattr(inner, "u_net"):
        raise ConfigError(f"{type(inner).__name__} has no u_net: bottleneck heads need k-diffusion's image_v1")
    return inner.u_net.d_blocks[-1]


def attach(node: dict, denoiser: nn.Module, num_attrs: int) -> nn.Module | None:
    """Build a HEADS node and hook it onto the denoiser's bottleneck."""
    block = bottleneck(denoiser)
    channels = unwrap_inner(denoiser).channels[-1]
    head = HEADS.build(node, num_attrs=num_attrs, channels=channels)
    if head is not None:
        head.handle = block.register_forward_hook(head.hook)
    return head
