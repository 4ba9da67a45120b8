"""k-diffusion models in the MODELS registry, and the Denoiser wrapper that preconditions them."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import k_diffusion as K
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import DENOISER_LOSSES, MODELS


@MODELS.register("image_v1")
def image_v1(
    mapping_cond_dim: int,  # Injected: the conditioner's .dim.
    *,
    input_channels: int = 3,
    mapping_out: int = 128,  # Width of the mapping network (noise level + condition embedding).
    depths: Sequence[int] = (1, 2, 2),  # Residual blocks per U-Net stage.
    channels: Sequence[int] = (32, 64, 128),  # Channels per U-Net stage; each stage after the first halves H, W.
    self_attn_depths: Sequence[bool] | None = None,  # Self-attention per stage; None is none.
    dropout_rate: float = 0.0,
    patch_size: int = 1,
    skip_stages: int = 0,
    augment_wrapper: bool = False,  # Wrap in KarrasAugmentWrapper (adds 9 aug_cond dims to mapping_cond).
    coord_channels: bool = False,  # Feed x/y coordinate maps through unet_cond, so global conditions can place things.
    has_variance: bool = False,  # One more output channel, its mean a learned log-variance (denoiser.loss: uncertainty).
    cross_attn_depths: Sequence[bool] | None = None,  # Cross-attention to condition tokens per stage (gmm_tokens).
    cross_cond_dim: int = 0,  # Width of the condition tokens cross-attention reads; 0: none (gmm_tokens needs > 0).
) -> nn.Module:
    """Build k-diffusion's ``image_v1`` U-Net through ``k_diffusion.config.make_model``."""
    config = image_v1_config(mapping_cond_dim, input_channels=input_channels, mapping_out=mapping_out, depths=depths,
                             channels=channels, self_attn_depths=self_attn_depths, dropout_rate=dropout_rate,
                             patch_size=patch_size, skip_stages=skip_stages, augment_wrapper=augment_wrapper,
                             coord_channels=coord_channels, has_variance=has_variance,
                             cross=(cross_attn_depths, cross_cond_dim))
    model = K.config.make_model(config)
    return CoordChannels(model) if coord_channels else model


def image_v1_config(mapping_cond_dim: int, *, input_channels: int, mapping_out: int, depths: Sequence[int],
                    channels: Sequence[int], self_attn_depths: Sequence[bool] | None, dropout_rate: float,
                    patch_size: int, skip_stages: int, augment_wrapper: bool, coord_channels: bool,
                    has_variance: bool, cross: tuple = (None, 0)) -> dict:
    """Return k-diffusion's resolved config for :func:`image_v1` (whose defaults apply; a resolved ``model``
    section has every argument); coordinate maps, when asked for, take the two ``unet_cond`` channels; ``cross``
    is (cross_attn_depths, cross_cond_dim)."""
    if len(depths) != len(channels):
        raise ConfigError(f"model.depths ({list(depths)}) and model.channels ({list(channels)}) need the same length")
    cross_depths, cross_dim = cross
    cross_depths = list(cross_depths or [False] * len(depths))
    if len(cross_depths) != len(depths) or (cross_dim > 0) != any(cross_depths):
        raise ConfigError(f"model.cross_attn_depths ({cross_depths}) needs one entry per stage, and at least one true "
                          f"exactly when model.cross_cond_dim > 0 (now {cross_dim})")
    return K.config.load_config({
        "model": {
            "type": "image_v1",
            "input_channels": input_channels,
            "input_size": [0, 0],  # unused by image_v1
            "mapping_out": mapping_out,
            "depths": list(depths),
            "channels": list(channels),
            "self_attn_depths": list(self_attn_depths or [False] * len(depths)),
            "dropout_rate": dropout_rate,
            "patch_size": patch_size,
            "skip_stages": skip_stages,
            "augment_wrapper": augment_wrapper,
            "mapping_cond_dim": mapping_cond_dim,
            "unet_cond_dim": 2 if coord_channels else 0,
            "cross_cond_dim": cross_dim,
            "cross_attn_depths": cross_depths,
            "has_variance": has_variance,
        },
    })


class CoordChannels(nn.Module):
    """Give a k-diffusion model fixed y/x coordinate maps in [-1, 1] through its ``unet_cond`` input.

    CoordConv (Liu et al. 2018): image_v1 sees the condition only as a global AdaGN vector, and a
    convolutional network without coordinates learns "draw it top left" slowly; with them, quickly.
    """

    def __init__(self, inner_model: nn.Module):
        super().__init__()
        self.inner_model = inner_model

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        b, _, h, w = input.shape
        ys = torch.linspace(-1, 1, h, device=input.device, dtype=input.dtype)
        xs = torch.linspace(-1, 1, w, device=input.device, dtype=input.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)
        return self.inner_model(input, sigma, unet_cond=grid, **kwargs)

    def param_groups(self, *args, **kwargs):
        return self.inner_model.param_groups(*args, **kwargs)


class AttributeTokens(nn.Module):
    """Hand a k-diffusion model one cross-attention token per attribute, unpacked from the flat condition a
    :class:`gmmcond.modeling.conditioners.GMMTokens` encodes (so CFG, composed and head guidance, inversion, the
    CoInD penalty and the export carry the tokens as they carry any ``mapping_cond``).

    The flat condition is ``[Z_1 A_1 m_1, ..., Z_K A_K m_K, m_1 .. m_K, dropped]`` (latents [N] per attribute, the
    known bits, the dropped flag). Token k is ``W (Z_k A_k) + e_k``, a shared projection of the attribute's GMM latent
    (zero when absent) plus a learned embedding of k; an attribute left open (m_k = 0) or a dropped condition pads
    it out. A learned null token is always present, so a condition with every attribute padded still attends to
    something. With ``pooled`` the flat condition also reaches the model as its ``mapping_cond``.
    """

    def __init__(self, inner_model: nn.Module, num_attrs: int, dims_per_attr: int, token_dim: int, pooled: bool):
        super().__init__()
        self.inner_model, self.num_attrs, self.dims_per_attr, self.pooled = inner_model, num_attrs, dims_per_attr, pooled
        self.project = nn.Linear(dims_per_attr, token_dim, bias=False)
        self.attr_embed = nn.Parameter(torch.randn(num_attrs, token_dim) / token_dim ** 0.5)
        self.null_token = nn.Parameter(torch.randn(token_dim) / token_dim ** 0.5)

    def tokens(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens [B, 1 + K, D] (the null token first) and their padding [B, 1 + K] (1: padded) of ``cond``."""
        b, k, n = len(cond), self.num_attrs, self.dims_per_attr
        z = cond[:, :k * n].view(b, k, n)
        shown = cond[:, k * n:k * n + k] * (1 - cond[:, -1:])  # known and not dropped
        tokens = self.project(z.to(self.project.weight.dtype)) + self.attr_embed
        tokens = torch.cat([self.null_token.expand(b, 1, -1), tokens], 1)
        return tokens, torch.cat([shown.new_zeros(b, 1), 1 - shown], 1)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, mapping_cond: torch.Tensor, **kwargs) -> torch.Tensor:
        tokens, padding = self.tokens(mapping_cond)
        return self.inner_model(input, sigma, mapping_cond=mapping_cond if self.pooled else None, cross_cond=tokens,
                                cross_cond_padding=padding, **kwargs)


DENOISER_LOSSES.register("karras", partial(K.layers.Denoiser, weighting="karras"))  # Karras et al. preconditioned x0 loss
DENOISER_LOSSES.register("snr", partial(K.layers.Denoiser, weighting="snr"))
DENOISER_LOSSES.register("soft_min_snr", partial(K.layers.Denoiser, weighting="soft-min-snr"))
DENOISER_LOSSES.register("eps", K.layers.SimpleLossDenoiser)  # L_simple on the predicted noise, the paper's loss
# The Karras loss divided by a learned variance, plus its log ((err^2 / e^u + u) / 2): uncertainty weighting, each
# sample's weight learned (Kendall and Gal 2017; EDM2, Karras et al. 2024, learns it per noise level). k-diffusion's
# own: the log-variance u is the mean of the model's extra output channel (model.has_variance: true).
DENOISER_LOSSES.register("uncertainty", K.layers.DenoiserWithVariance)


def make_denoiser(inner_model: nn.Module, *, sigma_data: float = 0.5, loss: str = "karras") -> K.layers.Denoiser:
    """Wrap an inner model in k-diffusion's Denoiser for the configured loss (a ``DENOISER_LOSSES`` key)."""
    denoiser = DENOISER_LOSSES.get(loss)(inner_model, sigma_data=sigma_data)
    has_variance = bool(getattr(unwrap_inner(inner_model), "has_variance", False))
    if has_variance != isinstance(denoiser, K.layers.DenoiserWithVariance):
        raise ConfigError("denoiser.loss: uncertainty and model.has_variance: true go together (the loss trains the "
                          f"model's log-variance channel); got loss {loss!r} with has_variance {has_variance}")
    return denoiser


def unwrap_inner(model: nn.Module) -> nn.Module:
    """Return the innermost k-diffusion model under Denoiser and KarrasAugmentWrapper layers."""
    while hasattr(model, "inner_model"):
        model = model.inner_model
    return model
