"""What a request's open attributes mean: one switch, ``open``, for every place a request is turned into rows.

* ``data`` (default): each sample's open attributes are drawn from the run's attribute prior given what was
  named (:class:`gmmcond.data.prior.AttributePrior`), and the model is conditioned on the whole row. Works
  for every conditioner and costs no training. Negation is the same path (``~red``: the colour is drawn
  from the rows with red absent, in their proportions).
* ``absent``: an open attribute is absent (A_k = 0), what a model trained without ``attr_dropout`` saw for
  an attribute it did not have; the behaviour before ``data``, kept so older grids and numbers reproduce.
* ``model``: the run hides the open attributes itself (its conditioner's "known" bits), which needs a run
  trained with ``conditioner.attr_dropout > 0`` (recipe ``shapes_compose``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.attrs import AttrRequest
from ..data.prior import AttributePrior, Conditional
from ..errors import ConfigError

OPEN_MODES = ("data", "absent", "model")
DEFAULT_OPEN = "data"


@dataclass
class Resolved:
    """Requests turned into conditioning rows: ``attrs`` [B, K] and, for ``open="model"``, ``known`` [B, K]."""

    attrs: torch.Tensor
    known: torch.Tensor | None
    open: str
    conditionals: list[Conditional | None] = field(default_factory=list)  # per request (``data`` only)
    notes: list[str] = field(default_factory=list)  # one line per request whose rows were not drawn exactly


def check_open(open: str, partial: bool) -> None:
    """Refuse an unknown mode, and ``model`` on a run that cannot hide attributes."""
    if open not in OPEN_MODES:
        raise ConfigError(f"open={open!r}: an open attribute means one of {', '.join(OPEN_MODES)} "
                          f"(data: drawn from the training rows; absent; model: hidden by a run trained with attr_dropout)")
    if open == "model" and not partial:
        raise ConfigError("open=model needs a run trained with conditioner.attr_dropout > 0 (e.g. the shapes_compose "
                          "recipe), whose conditioner can leave attributes unspecified; this run cannot: use open=data "
                          "(open attributes drawn from the data) or open=absent")


def resolve_requests(requests: list[AttrRequest], n: int, *, open: str = DEFAULT_OPEN,
                     prior: AttributePrior | None = None, partial: bool = False, seed: int = 0) -> Resolved:
    """Turn each request into ``n`` conditioning rows (request-major, like ``repeat_interleave``).

    ``data`` draws each row's open attributes from ``prior`` with a generator seeded by ``seed`` (its own
    stream: the images' noise and latents are unchanged by it); ``absent`` and ``model`` repeat the request.
    ``partial`` says whether the run's conditioner can hide attributes (needed by ``model``)."""
    check_open(open, partial)
    if open == "data":
        if prior is None:
            raise ConfigError("open=data draws the open attributes from the run's attribute prior; none was given")
        gen = torch.Generator().manual_seed(seed)
        rows, conds, notes = [], [], []
        for request in requests:
            drawn, cond = prior.draw(request, n, gen)
            rows.append(drawn)
            conds.append(cond)
            if not cond.exact:
                notes.append(f"'{request.text}': {cond.support} training item(s) hold this request (fewer than "
                             f"{prior.min_items}); its open attributes are drawn from the {cond.rule}")
        return Resolved(torch.cat(rows) if rows else torch.zeros(0, len(prior.names)), None, open, conds, notes)
    values = torch.stack([r.values for r in requests]).repeat_interleave(n, 0)
    known = torch.stack([r.known for r in requests]).repeat_interleave(n, 0) if open == "model" else None
    return Resolved(values, known, open, [None] * len(requests))
