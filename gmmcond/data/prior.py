"""The attribute prior a run carries: its training split's attribute rows, as distinct rows with their counts.

A request names some attributes (present, or ``~absent``) and leaves the rest open. With the prior, an open
attribute means what it means in the data: p(x | a_S) = sum over a_U of p(a_U | a_S) p(x | a_S, a_U), so
each sample draws its open attributes a_U from the training rows consistent with what was named
(correlations between open attributes kept) and the model is conditioned on the whole row, the condition
it was trained on. :meth:`AttributePrior.conditional` gives that distribution:

* **exact**: the training rows consistent with the request, weighted by their counts, when they hold at
  least ``min_items`` training items (:data:`MIN_ITEMS`);
* **product of experts**, when fewer hold it (a combination held out of training, or one too rare to
  draw from): each named group g (a mutually exclusive group with a named member, or one named attribute
  outside the groups) is an expert p(a_U | a_g) over the table, and
  p(a_U | a_S) is proportional to prod_g p(a_U | a_g) / p(a_U) ** (G - 1),
  which is exact when the named groups are independent given a_U (Hinton 2002's product of experts,
  normalised by the prior counted G - 1 times too often). An expert whose own value no training row holds
  is left out (said in the rule); with none left the open attributes follow their marginal p(a_U).

The table is written into the run directory (``attr_prior.json``) when training starts; for an older run
it is counted from the dataset config when the data is at hand (:func:`gmmcond.modeling.runs.run_prior`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DatasetError
from ..io import read_json, write_json
from .attrs import AttrRequest

PRIOR_FILE = "attr_prior.json"  # in the run directory, beside dataset.json
MIN_ITEMS = 10  # a request fewer training items hold than this draws its open attributes from the product of experts
FORMAT = 1


@dataclass
class Conditional:
    """p(a | request) over whole attribute rows: ``rows`` [M, K] 0/1 with probabilities ``probs`` [M]."""

    rows: torch.Tensor
    probs: torch.Tensor
    rule: str  # "exact" or "product of experts ..." (what was combined, and what was left out)
    support: int  # training items consistent with the whole request

    @property
    def exact(self) -> bool:
        return self.rule == "exact"

    def marginals(self) -> torch.Tensor:
        """Each attribute's probability under this distribution [K]."""
        return (self.probs[:, None] * self.rows.double()).sum(0)


def attribute_rows(dataset: Dataset) -> torch.Tensor:
    """Every item's attribute row [N, K] (0/1 floats): ``dataset.attribute_rows()`` where the dataset has one
    (every registered dataset: no image is read), else each item read in turn."""
    rows = getattr(dataset, "attribute_rows", None)
    if callable(rows):
        return rows().float()
    items = [dataset[i][1] for i in tqdm(range(len(dataset)), desc="count attribute rows", leave=False)]
    return torch.stack(items).float() if items else torch.zeros(0, len(dataset.attr_names))


class AttributePrior:
    """The distinct attribute rows of a training split with their counts, and draws from p(a_U | a_S)."""

    def __init__(self, names: list[str], groups: list[list[str]], rows: torch.Tensor, counts: torch.Tensor,
                 min_items: int = MIN_ITEMS):
        if rows.ndim != 2 or rows.shape[1] != len(names) or len(rows) != len(counts) or len(rows) == 0:
            raise DatasetError(f"an attribute prior needs rows [M, {len(names)}] with M >= 1 counts; got rows "
                               f"{tuple(rows.shape)} and {len(counts)} counts")
        self.names, self.groups = list(names), [list(g) for g in groups]
        self.rows, self.counts = rows.float(), counts.long()
        self.min_items = min_items

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_rows(cls, rows: torch.Tensor, names: list[str], groups: list[list[str]] = ()) -> "AttributePrior":
        """Count the distinct rows of ``rows`` [N, K] (0/1)."""
        if len(rows) == 0:
            raise DatasetError("the training split holds no items, so there is no attribute prior to draw from")
        distinct, counts = torch.unique((rows > 0.5).to(torch.uint8), dim=0, return_counts=True)
        return cls(names, groups, distinct, counts)

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> "AttributePrior":
        """Count a (training) dataset's attribute rows."""
        return cls.from_rows(attribute_rows(dataset), dataset.attr_names, dataset.groups)

    def to_json(self) -> dict:
        return {"format": FORMAT, "attr_names": self.names, "groups": self.groups, "items": self.total,
                "rows": ["".join("1" if v > 0.5 else "0" for v in row) for row in self.rows.tolist()],
                "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, obj: dict, where: str = PRIOR_FILE) -> "AttributePrior":
        try:
            if obj["format"] != FORMAT:
                raise ValueError(f"format {obj['format']}, this version reads {FORMAT}")
            rows = torch.tensor([[float(c == "1") for c in r] for r in obj["rows"]])
            return cls(obj["attr_names"], obj["groups"], rows, torch.tensor(obj["counts"]))
        except (KeyError, TypeError, ValueError, DatasetError) as exc:
            raise DatasetError(f"{where}: not an attribute prior ({exc}); delete it and it is counted again "
                               f"from the dataset") from None

    # -------------------------------------------------------------------------------------------- queries
    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def _matching(self, values: torch.Tensor, known: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Rows that agree with ``values`` wherever ``known`` (restricted to ``columns`` if given): mask [M]."""
        mask = known > 0.5
        if columns is not None:
            mask = mask & columns
        return ((self.rows[:, mask] > 0.5) == (values[mask] > 0.5)).all(1)

    def experts(self, request: AttrRequest) -> list[torch.Tensor]:
        """The named groups of ``request`` as column masks [K]: each mutually exclusive group with a named member,
        and each named attribute outside the groups."""
        known = request.known > 0.5
        grouped = torch.zeros(len(self.names), dtype=torch.bool)
        out = []
        for group in self.groups:
            cols = torch.zeros(len(self.names), dtype=torch.bool)
            cols[[self.names.index(g) for g in group]] = True
            grouped |= cols
            if (cols & known).any():
                out.append(cols & known)
        for k in torch.nonzero(known & ~grouped).flatten().tolist():
            cols = torch.zeros(len(self.names), dtype=torch.bool)
            cols[k] = True
            out.append(cols)
        return out

    def conditional(self, request: AttrRequest) -> Conditional:
        """p(a | request): the consistent training rows (exact), or the product of experts (module docstring)."""
        if len(request.values) != len(self.names):
            raise DatasetError(f"the request has {len(request.values)} attributes, the prior {len(self.names)}")
        values, known = request.values.float(), request.known.float()
        match = self._matching(values, known)
        support = int(self.counts[match].sum())
        if support >= self.min_items:
            probs = self.counts[match].double()
            return Conditional(self.rows[match], probs / probs.sum(), "exact", support)
        open_cols = known < 0.5
        if not open_cols.any():  # everything named: the row itself
            return Conditional(values[None].clone(), torch.ones(1, dtype=torch.float64), "exact", support)
        # the open part of every table row, and its distinct patterns u with p(u)
        patterns, inverse = torch.unique(self.rows[:, open_cols], dim=0, return_inverse=True)
        marginal = torch.zeros(len(patterns), dtype=torch.float64).index_add_(0, inverse, self.counts.double())
        marginal /= marginal.sum()
        log_score = torch.zeros(len(patterns), dtype=torch.float64)
        used, dropped = [], []
        for cols in self.experts(request):
            hit = self._matching(values, known, cols)
            name = describe_part(values, cols, self.names)
            if not hit.any():
                dropped.append(name)
                continue
            given = torch.zeros(len(patterns), dtype=torch.float64).index_add_(0, inverse[hit], self.counts[hit].double())
            log_score += (given / given.sum()).log() - marginal.log()
            used.append(name)
        log_score += marginal.log()  # prod_g p(u | a_g) / p(u) ** (G - 1)
        probs = (log_score - log_score.max()).exp() if torch.isfinite(log_score).any() else marginal.clone()
        probs[~torch.isfinite(log_score)] = 0
        if probs.sum() <= 0:  # the experts share no pattern: fall back on the marginal
            probs, used = marginal.clone(), []
        keep = probs > 0
        rows = values[None].repeat(int(keep.sum()), 1)
        rows[:, open_cols] = patterns[keep]
        rule = ("product of experts p(u | " + ") p(u | ".join(used) + ")" if used else "the open attributes' marginal p(u)")
        if dropped:
            rule += f"; left out (no training row holds them): {', '.join(dropped)}"
        return Conditional(rows, probs[keep] / probs[keep].sum(), rule, support)

    def draw(self, request: AttrRequest, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Conditional]:
        """``n`` whole rows [n, K] from p(a | request) (seeded by ``generator``) and the conditional drawn from."""
        cond = self.conditional(request)
        picks = torch.multinomial(cond.probs, n, replacement=True, generator=generator)
        return cond.rows[picks].clone(), cond

    def frequencies(self, request: AttrRequest) -> dict[str, float]:
        """Each open attribute's probability under p(a | request)."""
        freq = self.conditional(request).marginals()
        return {n: float(f) for n, f, k in zip(self.names, freq, request.known) if k < 0.5}


def describe_part(values: torch.Tensor, cols: torch.Tensor, names: list[str]) -> str:
    """A named group as text: its present member, or its absent ones with ``~``."""
    on = [names[k] for k in torch.nonzero(cols).flatten().tolist() if values[k] > 0.5]
    off = ["~" + names[k] for k in torch.nonzero(cols).flatten().tolist() if values[k] <= 0.5]
    return ",".join(on or off)


def save_prior(path: str | Path, prior: AttributePrior) -> None:
    """Write ``prior`` as JSON (atomically)."""
    write_json(path, prior.to_json())


def load_prior(path: str | Path) -> AttributePrior:
    """Read a prior :func:`save_prior` wrote; a file that is not one is a DatasetError naming it."""
    return AttributePrior.from_json(read_json(path), str(path))
