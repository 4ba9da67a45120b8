"""Classifier heads on the denoiser's U-Net bottleneck."""
from __future__ import annotations

from torch import nn

from .registry import HEADS


@HEADS.register("none")
def no_head(num_attrs: int, channels: int) -> None:
    """No head: plain diffusion training."""
    return None


def attach(node: dict, denoiser: nn.Module, num_attrs: int) -> nn.Module:
    """Build a head node and hook it onto the denoiser's bottleneck."""
    raise NotImplementedError("bottleneck heads arrive with issue 5")
