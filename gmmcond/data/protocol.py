"""The evaluation protocol: everything offline evaluation needs to know about a dataset, in one interface.

:mod:`gmmcond.eval` never asks a dataset what it can do; it asks the dataset's protocol, an
:class:`EvaluationProtocol` registered in ``EVAL_PROTOCOLS`` under the dataset's ``DATASETS`` key
(:func:`protocol_for`). A dataset without one gets :class:`GenericProtocol`. What a protocol provides:

* two views of the held-out split, row for row: ``cond_set`` in the run's labelling (its rows condition the
  samples) and ``eval_set`` in the evaluator's (shapes: a class-labelled run is scored on the 11 features);
* ``requested(n)``: what the first ``n`` rows ask for in the evaluator's attributes, and which of those a
  request fixes (a class label fixes shape and colour, not the size);
* ``reference(n)``: the real-vs-real reference set B for set A (the first ``n`` held-out images), row i of
  B with row i of A's attributes: exactly, with fresh nuisances, where the dataset can redraw (shapes);
  otherwise other held-out images with the same rows, the nearest row where none is left, and says how many
  matched;
* ``defect(image, attrs)``: a renderer's rule for a broken image, where ``has_defect_rule`` (elsewhere the
  evaluator-based rule of :func:`gmmcond.eval.evaluate.defect_flags` applies);
* ``set_draws(i, count, stream)``: ``count`` real images with row i's attributes, for the per-set diversity
  metrics (only where ``can_redraw``), and ``nuisance_valid(i)``: which regressed nuisance columns are
  defined for row i;
* the evaluator's data: ``training_config(dataset_cfg)`` (what it learns from), ``scoring_config`` (where its
  held-out scores come from), ``nuisance_columns`` and ``nuisance_targets`` (what it regresses).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..registry import DATASETS, EVAL_PROTOCOLS


@dataclass
class Reference:
    """The real-vs-real reference B: images row-matched to set A, their rows in the evaluator's labels."""

    images: torch.Tensor  # [n, 3, H, W]
    rows: torch.Tensor  # [n, K] in the evaluator's attributes
    description: str  # how B was made, for eval.json
    rows_matched: float  # fraction of B's rows equal to A's (1 where redrawn)


def stack_items(dataset: Dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the images and attribute rows of ``dataset`` at ``indices`` as two tensors."""
    items = [dataset[i] for i in indices]
    return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


class EvaluationProtocol(ABC):
    """What evaluating a model of one dataset needs; built from the run's dataset config.

    Subclasses implement :meth:`reference`; the rest has defaults that fit a dataset whose labels are the
    evaluator's, with no renderer behind it.
    """

    can_redraw = False  # set_draws gives real images with any held-out row's attributes
    nuisance_columns: tuple[str, ...] = ()  # what the evaluator regresses besides the attributes

    def __init__(self, dataset_cfg: dict):
        self.dataset_cfg = dict(dataset_cfg)
        self.cond_set, self.eval_set = self.views(self.dataset_cfg)
        self.attr_names = list(self.eval_set.attr_names)  # the evaluator's attributes
        self.groups = [list(g) for g in self.eval_set.groups]  # mutually exclusive groups among them

    @classmethod
    def views(cls, dataset_cfg: dict) -> tuple[Dataset, Dataset]:
        """The held-out split in the run's labelling and in the evaluator's (here the same dataset)."""
        test = DATASETS.build(dict(dataset_cfg, split="test"))
        return test, test

    def check_size(self, n: int, factor: int = 1) -> None:
        """Refuse an ``n`` the held-out split cannot serve ``factor`` times over."""
        if len(self.cond_set) < factor * n:
            need = f"the reference needs {factor}n = {factor * n}" if factor > 1 else f"fewer than n={n}"
            raise DatasetError(f"the held-out split has {len(self.cond_set)} images; {need}; lower --n")

    def set_a(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Set A: the first ``n`` held-out images and the run's attribute rows that condition the samples."""
        self.check_size(n)
        return stack_items(self.cond_set, range(n))

    def requested(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What each of the first ``n`` rows asks for in the evaluator's attributes (targets) and which of them
        the request fixes (known, 1/0): here the run's rows themselves, every attribute fixed."""
        rows = self.rows(range(n))
        return rows, torch.ones_like(rows)

    def rows(self, indices) -> torch.Tensor:
        """Attribute rows of the held-out split in the evaluator's labels (reads the items; subclasses read a table)."""
        return torch.stack([self.eval_set[i][1] for i in indices])

    @abstractmethod
    def reference(self, n: int) -> Reference:
        """The real reference B for set A = the first ``n`` held-out images."""

    has_defect_rule = False  # defect() judges images (a renderer's rule); else evaluate uses the evaluator

    def defect(self, image: torch.Tensor, attrs: torch.Tensor | None) -> Any:
        """Whether ``image`` (asked for ``attrs``, or any attributes if None) is broken: an object with ``.defect``
        (bool) and ``.reason`` ("ok" or a category). Only where ``has_defect_rule``."""
        raise NotImplementedError(f"{type(self).__name__} has no defect rule (has_defect_rule is False)")

    def set_draws(self, index: int, count: int, stream: int) -> torch.Tensor:
        """``count`` real images with the attributes of held-out row ``index`` (draw stream ``stream``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot redraw an attribute row (can_redraw is False)")

    def nuisance_valid(self, index: int) -> list[bool]:
        """Which of ``nuisance_columns`` are defined for held-out row ``index``."""
        return [True] * len(self.nuisance_columns)

    @classmethod
    def training_config(cls, dataset_cfg: dict) -> dict:
        """The data an evaluator for ``dataset_cfg`` learns from: its train split, nothing excluded."""
        cfg = {k: v for k, v in dataset_cfg.items() if k != "exclude"}
        cfg["split"] = "train"
        return dict(sorted(cfg.items()))

    @classmethod
    def scoring_config(cls, dataset_cfg: dict, n: int) -> dict:
        """The held-out data an evaluator's own scores are measured on (``n`` images are read)."""
        return dict(cls.training_config(dataset_cfg), split="test")

    @classmethod
    def nuisance_targets(cls, dataset: Dataset, indices) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Regression targets in ``nuisance_columns`` order and their mask, or None where there are none."""
        return None


class GenericProtocol(EvaluationProtocol):
    """A dataset of real images with attribute labels and nothing behind them (CelebA, CIFAR-10, a folder).

    The reference B comes from held-out images after the first ``n``: for each row of A an unused image with
    the same attribute row where one is left, else the unused image whose row is nearest in Hamming distance,
    so B's attribute frequencies follow A's; ``Reference.rows_matched`` says how many matched exactly.
    """

    def reference(self, n: int) -> Reference:
        self.check_size(n, factor=2)
        total = len(self.cond_set)
        rows = self.rows(range(total))
        pool: dict[tuple, list[int]] = {}
        for j in range(total - 1, n - 1, -1):  # popped from the end: the lowest unused index first
            pool.setdefault(tuple(rows[j].tolist()), []).append(j)
        picked, unmatched = [-1] * n, []
        for i in range(n):
            same = pool.get(tuple(rows[i].tolist()))
            if same:
                picked[i] = same.pop()
            else:
                unmatched.append(i)
        free = torch.ones(total, dtype=torch.bool)
        free[:n] = False
        free[[j for j in picked if j >= 0]] = False
        for i in unmatched:  # the nearest row among the images still unused
            d = (rows - rows[i]).abs().sum(1).masked_fill(~free, float("inf"))
            picked[i] = int(d.argmin())
            free[picked[i]] = False
        matched = (n - len(unmatched)) / n
        images = stack_items(self.cond_set, picked)[0]
        how = (f"other held-out images with A's attribute rows ({n - len(unmatched)} of {n} exact, "
               f"the rest the nearest row left)")
        return Reference(images, rows[picked], how, matched)


class TableProtocol(GenericProtocol):
    """The generic protocol for datasets that hold their attribute rows as a tensor ``attrs`` (no decoding)."""

    def rows(self, indices) -> torch.Tensor:
        return self.eval_set.attrs[list(indices)]


def protocol_class(dataset_cfg: dict) -> type[EvaluationProtocol]:
    """The protocol registered for ``dataset_cfg["type"]``, else :class:`GenericProtocol`."""
    kind = dataset_cfg["type"]
    return EVAL_PROTOCOLS.get(kind) if kind in EVAL_PROTOCOLS else GenericProtocol


def protocol_for(dataset_cfg: dict) -> EvaluationProtocol:
    """Build the evaluation protocol of a run's dataset config (its held-out split is loaded now)."""
    return protocol_class(dataset_cfg)(dataset_cfg)
