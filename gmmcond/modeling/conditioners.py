"""Attribute conditioners: map binary attributes to k-diffusion's ``mapping_cond`` vector."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import GUIDANCE_NULLS
from ..errors import ConfigError
from ..registry import CONDITIONERS

PAIRINGS = ("fixed", "resample", "constant")
ATTR_DROPOUT_MODES = ("per_attribute", "per_sample")


class Conditioner(nn.Module):
    """What every registered conditioner shares: ``dim`` (0: no mapping_cond), the dropped-condition flag as
    the last of those dims, condition dropout in training, and two capabilities the rest of gmmcond asks
    about (here, nowhere else): ``partial`` (attributes may be left unspecified through a known mask) and
    ``pairs_latents`` (``fixed_latents(index)`` returns the latent paired with each training index)."""

    dim = 0
    partial = False
    pairs_latents = False
    tokens = False  # hands the model attribute tokens (GMMTokens): build() wraps it in AttributeTokens

    def __init__(self, num_attrs: int, cond_dropout: float = 0.0):
        super().__init__()
        if not 0 <= cond_dropout < 1:
            raise ConfigError(f"conditioner.cond_dropout must be in [0, 1), got {cond_dropout}")
        self.num_attrs, self.cond_dropout = num_attrs, cond_dropout
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows .to(device)
        self.units = [[k] for k in range(num_attrs)]  # attributes hidden together (set_groups)

    def set_groups(self, groups: list[list[int]]) -> None:
        """Tell the conditioner the mutually exclusive groups (attribute indices); :func:`build` calls it."""
        grouped = {k for g in groups for k in g}
        self.units = [list(g) for g in groups] + [[k] for k in range(self.num_attrs) if k not in grouped]

    def training_drop(self, n: int) -> torch.Tensor | None:
        """Which of ``n`` conditions to drop: each with probability ``cond_dropout`` in training, else none."""
        return torch.rand(n) < self.cond_dropout if self.training and self.cond_dropout > 0 else None

    def unconditional(self, n: int) -> torch.Tensor | None:
        """Return the dropped-condition input (zeros, flag = 1) for ``n`` samples (None without a condition)."""
        if not self.dim:
            return None
        out = self.anchor.new_zeros(n, self.dim)
        out[:, -1] = 1
        return out

    def all_unknown(self, n: int) -> torch.Tensor | None:
        """The condition with every attribute unspecified; None unless ``partial``."""
        return None

    def guidance_null(self, n: int, which: str = "dropped") -> torch.Tensor | None:
        """The condition guidance pushes away from (``sample.cfg_null``): ``dropped``, the dropped-condition input
        CFG was trained with (:meth:`unconditional`), or ``all_unknown``, every attribute unspecified but the
        condition present (:meth:`all_unknown`; a partial conditioner only)."""
        if which not in GUIDANCE_NULLS:
            raise ConfigError(f"sample.cfg_null must be one of {', '.join(GUIDANCE_NULLS)}, got {which!r}")
        if which == "dropped":
            return self.unconditional(n)
        if not self.partial:
            raise ConfigError("sample.cfg_null=all_unknown needs a run trained with conditioner.attr_dropout > 0 "
                              "(e.g. the shapes_compose recipe); use cfg_null=dropped for this one")
        return self.all_unknown(n)


@CONDITIONERS.register("gmm_attrs")
class GMMAttrs(Conditioner):
    """The paper's GMM attribute latent (Lu et al. Eq. 9) plus a dropped-condition flag.

    For every attribute k, Z_k in R^N has i.i.d. entries from a 1-D Gaussian mixture; the output is
    ``concat_k(Z_k * A_k)`` followed by one flag dimension that is 1 (with Z = 0) when the condition is
    dropped for classifier-free guidance, so "no attributes" and "unconditional" are different inputs.
    """

    def __init__(
        self,
        num_attrs: int,  # K, injected from the dataset.
        *,
        dims_per_attr: int = 4,  # N in Eq. 9.
        means: Sequence[float] = (1.0, 2.0, 3.0),  # Component means; away from 0 so presence shifts the mean.
        sigma: float = 0.3,  # Shared component std; the paper asks for mean spacing > sigma.
        weights: Sequence[float] | None = None,  # Component weights pi; None is uniform (the paper).
        pairing: str = "fixed",  # fixed: one latent per dataset index (the paper); resample: fresh each step;
        # constant: every entry the mixture's mean, no randomness (the controlled fixed-value ablation of Eq. 9).
        cond_dropout: float = 0.1,  # Probability of dropping the condition in training (for CFG).
        seed: int = 0,  # Seeds the fixed latent of every dataset index.
        attr_dropout: float = 0.0,  # Probability of hiding each attribute in training ("unspecified"); 0 is Eq. 9 exactly.
        attr_dropout_mode: str = "per_attribute",  # per_attribute: rate attr_dropout; per_sample: rate U(0, 2 attr_dropout).
        hide_groups: bool = False,  # Hide a mutually exclusive group (all shapes) as one unit, not member by member.
    ):
        super().__init__(num_attrs, cond_dropout)
        if pairing not in PAIRINGS:
            raise ConfigError(f"conditioner.pairing must be one of {', '.join(PAIRINGS)}, got '{pairing}'")
        weights = [1.0 / len(means)] * len(means) if weights is None else list(weights)
        if len(weights) != len(means):
            raise ConfigError(f"conditioner.weights has {len(weights)} entries but means has {len(means)}")
        if sigma <= 0 or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError("conditioner.sigma must be > 0 and conditioner.weights non-negative with a positive sum")
        if not 0 <= attr_dropout < 1:
            raise ConfigError(f"conditioner.attr_dropout must be in [0, 1), got {attr_dropout}")
        if attr_dropout_mode not in ATTR_DROPOUT_MODES:
            raise ConfigError(f"conditioner.attr_dropout_mode must be one of {', '.join(ATTR_DROPOUT_MODES)}, "
                              f"got '{attr_dropout_mode}'")
        if attr_dropout_mode == "per_sample" and attr_dropout > 0.5:
            raise ConfigError(f"conditioner.attr_dropout_mode=per_sample draws each sample's rate from U(0, 2 attr_dropout): "
                              f"attr_dropout must be <= 0.5, got {attr_dropout}")
        self.dims_per_attr = dims_per_attr
        self.sigma, self.pairing, self.seed = float(sigma), pairing, seed
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) / sum(weights), persistent=False)
        self.attr_dropout, self.attr_dropout_mode, self.hide_groups = attr_dropout, attr_dropout_mode, hide_groups
        # with attr_dropout > 0, one "known" bit per attribute sits before the dropped flag
        self.dim = num_attrs * dims_per_attr + (num_attrs if attr_dropout > 0 else 0) + 1

    @property
    def pairs_latents(self) -> bool:
        """Training paired each index with its ``fixed_latents`` (not under ``pairing: constant``)."""
        return self.pairing != "constant"

    @property
    def partial(self) -> bool:
        """Whether attributes can be left unspecified (trained with attr_dropout > 0)."""
        return self.attr_dropout > 0

    def all_unknown(self, n: int) -> torch.Tensor | None:
        """The condition with every attribute unspecified (CoInD's null); None unless ``partial``."""
        if not self.partial:
            return None
        zeros = self.means.new_zeros(n, self.num_attrs)
        return self.encode(zeros, self.means.new_zeros(n, self.num_attrs, self.dims_per_attr), known=zeros)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` fresh latents Z of shape [n, K, N] from the GMM (under ``pairing: constant`` the constant
        ones, without drawing from ``generator``)."""
        if self.pairing == "constant":
            return self.constant_latents(n)
        shape = (n, self.num_attrs, self.dims_per_attr)
        comp = torch.multinomial(self.weights.cpu(), shape[0] * shape[1] * shape[2], True, generator=generator)
        eps = torch.randn(shape, generator=generator)
        return (self.means.cpu()[comp].view(shape) + self.sigma * eps).to(self.means.device)

    def constant_latents(self, n: int) -> torch.Tensor:
        """Return ``n`` latents with every entry the mixture's mean (``pairing: constant``)."""
        return (self.weights * self.means).sum().expand(n, self.num_attrs, self.dims_per_attr).clone()

    def fixed_latents(self, index: torch.Tensor) -> torch.Tensor:
        """Return the latent paired with each dataset index: the same for an index on every call."""
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)) for i in index.tolist()]
        return torch.cat([self.sample_latents(1, g) for g in gens]) if gens else self.sample_latents(0)

    def encode(self, attrs: torch.Tensor, z: torch.Tensor, drop: torch.Tensor | None = None,
               known: torch.Tensor | None = None) -> torch.Tensor:
        """Return mapping_cond = [Z_1 A_1 m_1, ..., Z_K A_K m_K, (m_1 .. m_K), dropped] for latents ``z`` [B, K, N].

        ``known`` m [B, K] marks the specified attributes (default all); the m block exists only when
        the conditioner was built with attr_dropout > 0, so with attr_dropout = 0 this is Eq. 9 exactly.
        """
        if attrs.shape[-1] != self.num_attrs:
            raise ConfigError(f"gmm_attrs expects {self.num_attrs} attributes, got attrs of shape {tuple(attrs.shape)}")
        attrs = attrs.to(z)
        drop = torch.zeros(len(attrs), dtype=torch.bool, device=z.device) if drop is None else drop.to(z.device)
        keep = (~drop)[:, None].to(z)
        if known is not None and not self.partial and not bool((known > 0.5).all()):
            raise ConfigError("this gmm_attrs was trained with attr_dropout = 0: every attribute is specified "
                              "(unlisted ones mean absent); train with conditioner.attr_dropout > 0 to leave some unspecified")
        known = torch.ones_like(attrs) if known is None else known.to(z)
        feats = (z * (attrs * known)[..., None]).flatten(1) * keep
        parts = [feats, known * keep] if self.partial or self.tokens else [feats]
        return torch.cat([*parts, drop[:, None].to(z)], 1)

    def training_latents(self, n: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """The latents training pairs with ``n`` items: each index's own under ``pairing: fixed`` (when indices are
        given), else fresh draws (the constant ones under ``pairing: constant``)."""
        if self.pairing == "fixed" and index is not None:
            return self.fixed_latents(index).to(self.means.device)
        return self.sample_latents(n)

    def forward(self, attrs: torch.Tensor, index: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode attributes; in training mode, drop the condition with probability ``cond_dropout``."""
        z = self.training_latents(len(attrs), index)
        if drop is None:
            drop = self.training_drop(len(attrs))
        known = self.training_known(len(attrs)).to(z) if self.training and self.partial else None
        return self.encode(attrs, z, drop, known)

    def training_known(self, n: int) -> torch.Tensor:
        """Which attributes a training condition specifies [n, K]: each hidden with probability ``attr_dropout``
        (``per_sample``: with a rate drawn per sample from U(0, 2 attr_dropout), so conditions with most attributes
        unspecified occur as often as nearly complete ones); ``hide_groups`` hides a group's members together."""
        units = self.units if self.hide_groups else [[k] for k in range(self.num_attrs)]
        rate = self.attr_dropout if self.attr_dropout_mode == "per_attribute" else 2 * self.attr_dropout * torch.rand(n, 1)
        shown = torch.rand(n, len(units)) >= rate
        if not self.hide_groups:
            return shown.float()
        known = torch.empty(n, self.num_attrs)
        for u, members in enumerate(units):
            known[:, members] = shown[:, u:u + 1].float()
        return known


@CONDITIONERS.register("gmm_tokens")
class GMMTokens(GMMAttrs):
    """The GMM attribute latent as tokens: one cross-attention token per attribute (its latent Z_k A_k through a
    shared projection, plus a learned embedding of k), and an always-present null token, read by ``image_v1``'s
    cross-attention (:class:`gmmcond.modeling.models.AttributeTokens`). An open attribute (``attr_dropout > 0``)
    and a dropped condition pad tokens out instead of zeroing them, so a model can attend to what was named and
    nothing else. The condition travels as the flat vector of :class:`GMMAttrs` with its known bits always present,
    so every sampler and guidance wrapper carries it unchanged. ``pooled``: the flat condition also reaches the
    model's mapping network, as :class:`GMMAttrs` does (tokens beside the pooled vector).

    The model needs ``model.cross_cond_dim`` (the token width) and ``model.cross_attn_depths``.
    """

    tokens = True

    def __init__(
        self,
        num_attrs: int,  # K, injected from the dataset.
        *,
        dims_per_attr: int = 4,  # N in Eq. 9.
        means: Sequence[float] = (1.0, 2.0, 3.0),
        sigma: float = 0.3,
        weights: Sequence[float] | None = None,
        pairing: str = "fixed",
        cond_dropout: float = 0.1,
        seed: int = 0,
        attr_dropout: float = 0.0,  # Probability of padding each attribute's token in training ("unspecified").
        attr_dropout_mode: str = "per_attribute",
        hide_groups: bool = False,
        pooled: bool = False,  # Also feed the flat condition to the mapping network (tokens beside the pooled vector).
    ):
        super().__init__(num_attrs, dims_per_attr=dims_per_attr, means=means, sigma=sigma, weights=weights,
                         pairing=pairing, cond_dropout=cond_dropout, seed=seed, attr_dropout=attr_dropout,
                         attr_dropout_mode=attr_dropout_mode, hide_groups=hide_groups)
        self.pooled = pooled
        self.dim = num_attrs * dims_per_attr + num_attrs + 1  # the known bits always: they say which tokens to pad

    @property
    def mapping_dim(self) -> int:
        """What the model's mapping network reads: the flat condition with ``pooled``, else nothing."""
        return self.dim if self.pooled else 0


@CONDITIONERS.register("attrs")
class FixedAttrs(Conditioner):
    """Attributes as a fixed value, the plain k-diffusion way: ``mapping_cond = [A_1, ..., A_K, dropped]``.

    The model's mapping network turns the 0/1 vector into its embedding (its first linear layer gives every
    present attribute a learned vector), so each attribute row has one condition and the image's variation
    comes from the noise alone: the baseline against which the GMM latent of :class:`GMMAttrs` is compared
    (``reproduce.py distribution``). The dropped flag works as in :class:`GMMAttrs` (CFG).
    """

    def __init__(
        self,
        num_attrs: int,  # K, injected from the dataset.
        *,
        cond_dropout: float = 0.1,  # Probability of dropping the condition in training (for CFG).
        seed: int = 0,  # Not used (there is no latent to seed); accepted so experiments seed every conditioner alike.
    ):
        super().__init__(num_attrs, cond_dropout)
        self.seed = seed
        self.dim = num_attrs + 1

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return an empty latent [n, K, 0] (there is none; the generator is not drawn from)."""
        return self.anchor.new_zeros(n, self.num_attrs, 0)

    def encode(self, attrs: torch.Tensor, z: torch.Tensor | None = None, drop: torch.Tensor | None = None,
               known: torch.Tensor | None = None) -> torch.Tensor:
        """Return mapping_cond = [A * kept, dropped] [B, K + 1] (``z`` is ignored; it is empty)."""
        if attrs.shape[-1] != self.num_attrs:
            raise ConfigError(f"attrs expects {self.num_attrs} attributes, got attrs of shape {tuple(attrs.shape)}")
        if known is not None and not bool((known > 0.5).all()):
            raise ConfigError("the attrs conditioner specifies every attribute (unlisted ones mean absent); use "
                              "gmm_attrs with conditioner.attr_dropout > 0 to leave some unspecified")
        attrs = attrs.to(self.anchor)
        drop = torch.zeros(len(attrs), dtype=torch.bool, device=attrs.device) if drop is None else drop.to(attrs.device)
        return torch.cat([attrs * (~drop)[:, None].to(attrs), drop[:, None].to(attrs)], 1)

    def forward(self, attrs: torch.Tensor, index: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode attributes; in training mode, drop the condition with probability ``cond_dropout``."""
        return self.encode(attrs, drop=self.training_drop(len(attrs)) if drop is None else drop)


@CONDITIONERS.register("none")
class NoConditioner(Conditioner):
    """Unconditional training: contributes no mapping_cond (dim 0)."""

    def __init__(self, num_attrs: int):
        super().__init__(num_attrs)

    def forward(self, attrs: torch.Tensor, index: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> None:
        """Return None: the model is called without mapping_cond."""
        return None
