"""Offline evaluation without downloaded weights: attribute accuracy, defects, quality and diversity.

Samples are conditioned on the attribute rows of a held-out real set A and compared with A in the
evaluator's features (:mod:`gmmcond.eval.evaluator`); every distance is reported beside its real-vs-real
reference, a second real set B with A's attribute rows (for shapes each row redrawn with fresh nuisances;
elsewhere other held-out images with the same rows). Accuracy and defects alone reward collapse, so each
report pairs them with recall, coverage and, per attribute set, the nuisance spread.

What a dataset knows comes through its evaluation protocol (:mod:`gmmcond.data.protocol`). On ``shapes``
defects are the renderer's own rule (:func:`gmmcond.data.shapes.check_image`: plain background, one
connected object of the requested size class, round second moments, a palette fill), with the evaluator's
uncertainty reported beside it. For datasets without such a rule, a sample is a defect when the evaluator
is unsure within a mutually exclusive group or when its features lie farther from every real image than 99%
of real held-out images do.

:func:`evaluate_run` loads a run and hands its :class:`RowSampler` to :func:`evaluate_sampler`, which scores any
sampler (another library's model too) in named steps: :func:`heldout` (sets A and B, what is asked), the sampler,
the evaluator's predictions, :func:`score`, :func:`per_set_diversity` and :func:`memorisation_check`;
:func:`write_outputs` draws the figures.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.protocol import EvaluationProtocol, Reference, protocol_for, stack_items
from ..modeling.build import Components
from ..modeling.precision import autocast
from ..modeling.runs import load_run
from ..errors import ConfigError, DatasetError
from ..io import write_json
from ..registry import DATASETS
from ..sampling.generate import generate
from ..sampling.settings import SamplingSettings
from ..visualize import captioned_grid, save_png
from .evaluator import evaluator_for
from .metrics import authenticity, nuisance_fidelity, prdc, set_metrics


METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")  # each beside its real-vs-real reference
SMALL_N = 64  # below this the k-NN metrics and KID are noise; evaluate_run warns
MEMORISATION_N = 256  # samples conditioned on training rows for the memorisation check
MEMORISATION_TRAIN_MAX = 20000  # training images searched for nearest neighbours (the first ones)
SPREAD_BAND = (0.85, 1.15)  # nuisance spread ratio target: two-sided, more variation than the data is not better


def headline(result: dict) -> dict:
    """The numbers an evaluation leads with: conformity (every requested attribute right), defects, and the
    per-attribute-set recall, coverage and nuisance spread beside their real-vs-real references. Whole-set
    FD / KID / PRDC and the mean per-attribute accuracy follow as secondary: they mostly measure whether the
    attribute mix is right, and a sampler that returns one real image per attribute row scores well on them."""
    out = {"all_attributes_correct": result["all_attributes_correct"], "defect_rate": result["defect_rate"]}
    per_set = result.get("per_set_mean", {})
    for key, name in (("recall", "set_recall"), ("coverage", "set_coverage")):
        if key in per_set:
            v = per_set[key]
            out[name] = {**v, "fraction_of_reference": v["value"] / v["real_reference"] if v["real_reference"] else None}
    if "mean_spread_ratio" in per_set:
        v = per_set["mean_spread_ratio"]
        out["set_spread_ratio"] = {**v, "target": list(SPREAD_BAND), "in_band": SPREAD_BAND[0] <= v["value"] <= SPREAD_BAND[1]}
    if "memorisation" in result:
        out["auth_pct"] = result["memorisation"]["auth_pct"]
    return out


def group_confidence(probs: torch.Tensor, names: list[str], groups: list[list[str]]) -> torch.Tensor:
    """Return, per image, the lowest over groups of the highest member probability (1 if no groups)."""
    conf = torch.ones(len(probs))
    for group in groups:
        cols = [names.index(g) for g in group]
        conf = torch.minimum(conf, probs[:, cols].max(1).values)
    return conf


def nearest_real_distance(feats: torch.Tensor, real: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Return each feature row's Euclidean distance to its nearest real feature row."""
    d = torch.cdist(feats, real)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values


def defect_flags(protocol: EvaluationProtocol, images: torch.Tensor, probs: torch.Tensor, target: torch.Tensor,
                 known: torch.Tensor, feats: torch.Tensor, real_feats: torch.Tensor) -> list[str]:
    """Return a reason per image ("ok" if none). Where the protocol has a defect rule (shapes: the renderer's),
    that rule alone decides; an unsure evaluator is reported beside it (:func:`unsure_rate`), not counted as
    a defect, since it can only fire where a requested attribute is already wrong. Without such a rule: far
    from every real image (beyond the 99th percentile of real-to-real nearest distances), or an unsure
    evaluator within a mutually exclusive group."""
    if protocol.has_defect_rule:
        reasons = []
        for img, t, kn in zip(images, target, known):
            check = protocol.defect(img, t if kn.all() else None)  # a class run does not fix the size
            reasons.append(check.reason if check.defect else "ok")
        return reasons
    conf = group_confidence(probs, protocol.attr_names, protocol.groups)
    real_nn = nearest_real_distance(real_feats, real_feats, exclude_self=True)
    far = nearest_real_distance(feats, real_feats) > torch.quantile(real_nn, 0.99)
    reasons = ["far from real data" if f else "ok" for f in far.tolist()]
    return [("unsure evaluator" if r == "ok" and c < 0.5 else r) for r, c in zip(reasons, conf.tolist())]


def unsure_rate(probs: torch.Tensor, names: list[str], groups: list[list[str]]) -> float:
    """The fraction of images whose most likely member of some mutually exclusive group has p < 0.5."""
    return (group_confidence(probs, names, groups) < 0.5).float().mean().item()


@dataclass
class Heldout:
    """The real side of an evaluation: set A, what its rows ask for, and the reference B."""

    protocol: EvaluationProtocol
    real_x: torch.Tensor  # A's images
    cond_attrs: torch.Tensor  # A's rows in the run's labelling: what conditions the samples
    target: torch.Tensor  # what each row asks for, in the evaluator's attributes
    known: torch.Tensor  # which of those the request fixes (1/0)
    reference: Reference  # B


def heldout(dataset_cfg: dict, n: int, evaluator_names: list[str]) -> Heldout:
    """Step 1: set A (the first ``n`` held-out images), the requests, and the reference B, from the protocol."""
    protocol = protocol_for(dataset_cfg)
    if list(evaluator_names) != protocol.attr_names:
        raise DatasetError(f"the evaluator scores {list(evaluator_names)[:4]}..., the dataset's evaluation attributes are "
                           f"{protocol.attr_names[:4]}...; pass --evaluator trained on this dataset's labels")
    real_x, cond_attrs = protocol.set_a(n)
    target, known = protocol.requested(n)
    return Heldout(protocol, real_x, cond_attrs, target, known, protocol.reference(n))


@dataclass(frozen=True)
class EvalSize:
    """How much an evaluation samples: ``n`` rows of set A, ``sets`` attribute sets of ``per_set`` for the per-set
    diversity, ``memorisation`` samples on training rows (0 skips it), in batches of ``batch``."""

    n: int = 512
    sets: int = 6
    per_set: int = 48
    memorisation: int = MEMORISATION_N
    batch: int = 64

    def __post_init__(self):
        if self.n <= 5 or (self.sets > 0 and self.per_set <= 5):
            raise ConfigError(f"evaluation needs n and per_set above 5 (the k-NN metrics use k = 5), got n={self.n}, "
                              f"per_set={self.per_set}")


@dataclass(frozen=True)
class RowSampler:
    """Step 2: one sample per attribute row with the run's components and sampling settings (precision resolved),
    in batches of ``batch``, batch i seeded ``seed + i``, under autocast."""

    parts: Components
    settings: SamplingSettings
    batch: int = 64
    progress: bool = True

    @property
    def seed(self) -> int:
        """The seed every evaluated sample is derived from."""
        return self.settings.seed

    def paired_latents(self, index: torch.Tensor) -> torch.Tensor | None:
        """The GMM latents training paired with the training rows ``index`` (None where the conditioner pairs none)."""
        conditioner = self.parts.conditioner
        return conditioner.fixed_latents(index) if conditioner.pairs_latents else None

    def __call__(self, attrs: torch.Tensor, seed: int, desc: str, latents: torch.Tensor | None = None,
                 progress: bool | None = None) -> torch.Tensor:
        device = next(self.parts.denoiser.parameters()).device
        chunks = attrs.split(self.batch)
        z = [None] * len(chunks) if latents is None else latents.split(self.batch)
        show = self.progress if progress is None else progress
        out = []
        for i, chunk in enumerate(tqdm(chunks, desc=desc, disable=not show)):
            with autocast(device, self.settings.precision):
                out.append(generate(self.parts, chunk, replace(self.settings, seed=seed + i), latents=z[i]).float())
        return torch.cat(out)


def score(sets: Heldout, images: torch.Tensor, fake: dict, real: dict, ref: dict) -> tuple[dict, list[str]]:
    """Step 4: conformity (and the real images' under the same evaluator), per-attribute accuracy, defects (and the
    real images' rate under the same rule), the evaluator's uncertainty, and the whole-set distances beside their
    real-vs-real references."""
    protocol, target, known = sets.protocol, sets.target, sets.known
    correct = ((fake["probs"] > 0.5).float() == target).float()
    real_correct = ((real["probs"] > 0.5).float() == target).float()  # set A's real images, read against their rows
    names = protocol.attr_names
    reasons = defect_flags(protocol, images, fake["probs"], target, known, fake["features"], real["features"])
    real_reasons = defect_flags(protocol, sets.real_x, real["probs"], sets.reference.rows, torch.ones_like(target),
                                real["features"], ref["features"])
    vs_real, reference_vs_real = set_metrics(real["features"], fake["features"]), set_metrics(real["features"], ref["features"])
    result = {
        "attr_accuracy": (correct * known).sum().item() / known.sum().item(),
        "all_attributes_correct": ((correct * known).sum(1) == known.sum(1)).float().mean().item(),
        # conformity's ceiling under this evaluator: the real images the samples' rows came from, read the same way
        "all_attributes_correct_real_reference": ((real_correct * known).sum(1) == known.sum(1)).float().mean().item(),
        "per_attribute": {nm: (correct[:, k][known[:, k] > 0]).mean().item() for k, nm in enumerate(names) if known[:, k].any()},
        "defect_rate": sum(r != "ok" for r in reasons) / len(reasons),
        "defect_reasons": {r: reasons.count(r) for r in sorted(set(reasons)) if r != "ok"},
        "real_heldout_defect_rate": sum(r != "ok" for r in real_reasons) / len(real_reasons),
        "unsure_rate": unsure_rate(fake["probs"], names, protocol.groups),  # beside the defects, not in them (shapes)
        **{key: {"value": vs_real[key], "real_reference": reference_vs_real[key]} for key in METRICS},
        "feature_dim": real["features"].shape[1],
        "feature_cov_min_eigenvalue": torch.linalg.eigvalsh(torch.cov(real["features"].double().T)).min().item(),
    }
    return result, reasons


def eval_stem(tag: str | None) -> str:
    """The file stem an evaluation writes under: ``eval`` (eval.json, eval_worst.png, ...) or ``eval_TAG``."""
    return "eval" if tag is None else f"eval_{tag}"


def evaluate_run(run_dir: str | Path, settings: SamplingSettings | Mapping | None = None, size: EvalSize | None = None,
                 *, evaluator: str | Path | None = None, weights: str = "ema", checkpoint: str | Path | None = None,
                 tag: str | None = None, write: bool = True, progress: bool = True) -> dict:
    """Evaluate a trained run offline; writes ``eval.json``, ``eval_worst.png``, ``eval_diversity.png`` and
    ``eval_memorisation.png`` (``eval_TAG.json`` and so on with a ``tag``, so evaluations under other settings
    sit beside it).

    Args:
        settings: how to sample (:class:`SamplingSettings`, or a mapping of overrides on the run's ``sample``
            section, e.g. ``{"steps": 30, "sampler": "dpmpp_2m"}``; None: the run's own). Its seed seeds every
            sample: set A's batch i is seeded ``seed + i``.
        size: how much to sample (:class:`EvalSize`): ``n`` samples conditioned on the attribute rows of the first
            ``n`` held-out real images (set A); ``sets`` attribute sets sampled ``per_set`` times each, against as
            many real redraws, for the per-set diversity (where the protocol can redraw and every attribute is
            fixed); ``memorisation`` samples on training rows for :func:`memorisation_check`.
        evaluator: an evaluator file to use instead of the default (the frozen one for the default shapes data).
        weights: ``"live"`` evaluates the trained weights before averaging (from the checkpoint), to judge the EMA.
        checkpoint: evaluate the EMA weights of this checkpoint instead of the run's newest weights.

    Changed in 0.2: the sampling keywords moved into ``settings``, ``n``, ``sets``, ``per_set``, ``memorisation``
    and ``batch`` into ``size``.
    """
    size = size or EvalSize()
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint=checkpoint, weights=weights)
    cfg, parts = run.cfg, run.parts
    settings = SamplingSettings.of_run(cfg, settings)
    settings = replace(settings, precision=settings.precision_for(cfg, next(parts.denoiser.parameters()).device))
    scored = evaluate_sampler(RowSampler(parts, settings, size.batch, progress), cfg["dataset"], size,
                              evaluator=evaluator, progress=progress)
    result = {
        "run": str(run_dir), "step": run.step, "weights": weights, "n": size.n, "sampler": settings.sampler,
        "steps": settings.steps, "cfg_scale": settings.cfg_scale, "cfg_null": settings.cfg_null,
        **({"cfg_interval": list(settings.cfg_interval)} if settings.cfg_interval else {}),
        "autocast": settings.precision, **scored.result,
    }
    result = {"headline": headline(result), **result}
    if write:
        write_outputs(run_dir, eval_stem(tag), result, scored)
    return result


@dataclass
class Scored:
    """What :func:`evaluate_sampler` measured (``result``) and what the figures are drawn from."""

    result: dict
    images: torch.Tensor
    reasons: list[str]
    fake: dict
    protocol: EvaluationProtocol
    figures: dict


def evaluate_sampler(sample_rows, dataset_cfg: dict, size: EvalSize, *, evaluator: str | Path | None = None,
                     progress: bool = True) -> Scored:
    """Score any sampler by the protocol :func:`evaluate_run` scores a run by. ``sample_rows`` is a
    :class:`RowSampler` or an object with its interface (``__call__(attrs, seed, desc, latents=None,
    progress=None)`` returning images in [-1, 1], ``seed``, ``paired_latents(index)``), e.g. another library's
    model (:mod:`gmmcond.experiments.peer`); ``dataset_cfg`` the data it was trained on."""
    warnings = []
    if size.n < SMALL_N:
        warnings.append(f"n={size.n} is below {SMALL_N}: precision, recall, density, coverage (k-NN radii) and KID are "
                        f"not meaningful at this size; use --n {SMALL_N} or more")
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    model, meta, evaluator_path = evaluator_for(dataset_cfg, evaluator, progress=progress)
    real_side = heldout(dataset_cfg, size.n, meta["attr_names"])
    images = sample_rows(real_side.cond_attrs, sample_rows.seed, "sample")
    real, ref, fake = (model.predict(x) for x in (real_side.real_x, real_side.reference.images, images))
    scores, reasons = score(real_side, images, fake, real, ref)
    result = {
        "evaluator": str(evaluator_path), "evaluator_hash": meta.get("dataset_hash"),
        "evaluator_weights_sha256": meta["weights_sha256"], "evaluator_heldout": meta["scores"],
        "reference": real_side.reference.description, "reference_rows_matched": real_side.reference.rows_matched,
        **scores, "warnings": warnings,
    }
    figures = {}
    if real_side.protocol.can_redraw and size.sets > 0 and bool(real_side.known.all()):  # every attribute fixed
        result["per_set"], figures["diversity"] = per_set_diversity(sample_rows, real_side, model, size)
        result.update(per_set_means(result["per_set"], real_side.protocol.nuisance_columns))
    if size.memorisation:
        result["memorisation"], figures["memorisation"] = memorisation_check(sample_rows, dataset_cfg, real_side,
                                                                             size.memorisation)
    return Scored(result, images, reasons, fake, real_side.protocol, figures)


def write_outputs(run_dir: Path, stem: str, result: dict, scored: Scored) -> None:
    """Step 6: STEM.json, STEM_worst.png (defects first, then the least confident samples) and each figure."""
    images, reasons, protocol = scored.images, scored.reasons, scored.protocol
    conf = group_confidence(scored.fake["probs"], protocol.attr_names, protocol.groups)
    order = sorted(range(len(images)), key=lambda i: (reasons[i] == "ok", conf[i].item()))[:32]
    rows = [images[order[j:j + 8]] for j in range(0, len(order), 8)]
    caps = [" | ".join(reasons[i][:14] for i in order[j:j + 8]) for j in range(0, len(order), 8)]
    save_png(captioned_grid(rows, caps, cell=64), run_dir / f"{stem}_worst.png")
    for name, (grid_rows, captions) in scored.figures.items():
        save_png(captioned_grid(grid_rows, captions, cell=48), run_dir / f"{stem}_{name}.png")
    write_json(run_dir / f"{stem}.json", result)


def memorisation_check(sample_rows: RowSampler, dataset_cfg: dict, sets: Heldout, m: int) -> tuple[dict, tuple[list, list]]:
    """Do samples copy training images? ``m`` samples are conditioned on the first ``m`` training rows, each with
    the GMM latent that training paired with that row (``fixed_latents``; under fixed pairing the one channel
    through which a sample could recall its own training image); the first ``m`` held-out images are the
    reference. In pixel space, against the first ``MEMORISATION_TRAIN_MAX`` training images: the authenticity
    percentage (Alaa et al. 2022; a real held-out set scores its own level, copies score 0), the median
    distance to the nearest training image, and how often that image is the sample's own training row
    (beside its chance level: one over the number of training images with the same attribute row).
    Returns the numbers and a figure (samples, their nearest training images, their paired training rows)."""
    train = DATASETS.build(dataset_cfg)  # the training split, as the run saw it
    k = min(len(train), MEMORISATION_TRAIN_MAX)
    m = min(m, k, len(sets.protocol.cond_set))
    train_x, train_attrs = stack_items(train, range(k))  # the first k only (the in-memory cache would render them all)
    index = torch.arange(m)
    latents = sample_rows.paired_latents(index)
    images = sample_rows(train_attrs[:m], sample_rows.seed + 104729, "memorisation", latents, progress=False)
    held = sets.real_x[:m] if m <= len(sets.real_x) else sets.protocol.set_a(m)[0]  # set A's first m, as far as it goes
    fake, real = authenticity(images, train_x), authenticity(held, train_x)
    out = {"n": m, "train_images": k, "space": "pixels",
           "latents": "each training row's paired GMM latent" if latents is not None else "none (no latent)",
           "auth_pct": {"value": fake["auth_pct"], "real_reference": real["auth_pct"]},
           "median_nearest_train_distance": {"value": fake["median_distance"], "real_reference": real["median_distance"]},
           "nearest_is_own_training_row": (fake["nearest_index"] == index).double().mean().item(),
           # what that rate would be if the nearest image were any training image with the same attribute row
           "own_row_chance": (1 / (train_attrs[:m, None] == train_attrs[None, :k]).all(-1).sum(1).double()).mean().item()}
    show = list(range(min(12, m)))
    rows = [images[show], train_x[fake["nearest_index"][show]], train_x[show]]
    return out, (rows, ["samples conditioned on training rows", "their nearest training images",
                        "the training rows they were conditioned on"])


def distinct_rows(attrs: torch.Tensor, count: int) -> list[int]:
    """The indices of the first ``count`` distinct rows of ``attrs``."""
    seen, chosen = set(), []
    for i in range(len(attrs)):
        key = tuple(attrs[i].tolist())
        if key not in seen:
            seen.add(key)
            chosen.append(i)
            if len(chosen) == count:
                break
    return chosen


def per_set_diversity(sample_rows: RowSampler, sets: Heldout, model, size: EvalSize) -> tuple[list, tuple]:
    """Step 5: per attribute set (the first ``size.sets`` distinct rows of A), ``size.per_set`` samples (fresh latents)
    against ``per_set`` real draws, and a second real draw as the reference: recall, coverage, precision and
    the nuisance W1 / spread ratio of each. Returns the rows and a figure (samples above real images)."""
    protocol, names = sets.protocol, sets.protocol.attr_names
    out, grid_rows, captions = [], [], []
    per_set = size.per_set
    for j, i in enumerate(distinct_rows(sets.cond_attrs, size.sets)):
        label = ",".join(nm for nm, v in zip(names, sets.target[i].tolist()) if v > 0.5)
        real_x, ref_x = protocol.set_draws(i, per_set, 100), protocol.set_draws(i, per_set, 1000)
        attrs = sets.cond_attrs[i].expand(per_set, -1).clone()
        fake_x = sample_rows(attrs, sample_rows.seed + 7919 * (j + 1), f"set {j + 1}", progress=False)
        real, ref, fake = model.predict(real_x), model.predict(ref_x), model.predict(fake_x)
        valid = [c for c, ok in enumerate(protocol.nuisance_valid(i)) if ok]
        cols = [protocol.nuisance_columns[c] for c in valid]

        def summary(other: dict) -> dict:
            fid = nuisance_fidelity(real["nuisances"][:, valid].numpy(), other["nuisances"][:, valid].numpy(), cols)
            pr = prdc(real["features"], other["features"])
            return {"recall": pr["recall"], "coverage": pr["coverage"], "precision": pr["precision"],
                    "nuisances": fid, "mean_spread_ratio": float(np.mean([v["spread_ratio"] for v in fid.values()])),
                    "mean_nuisance_w1": float(np.mean([v["w1"] for v in fid.values()]))}

        out.append({"attrs": label, **summary(fake), "reference": summary(ref)})
        grid_rows += [fake_x[:8], real_x[:8]]
        captions += [f"samples: {label}", "real, same attributes"]
    return out, (grid_rows, captions)


def per_set_means(rows: list[dict], columns) -> dict:
    """The per-set numbers averaged over sets (``per_set_mean``) and per nuisance column (``nuisance``)."""
    mean = {key: {"value": float(np.nanmean([r[key] for r in rows])),
                  "real_reference": float(np.nanmean([r["reference"][key] for r in rows]))}
            for key in ("recall", "coverage", "mean_spread_ratio", "mean_nuisance_w1")}
    nuisance = {col: {stat: {"value": float(np.nanmean([r["nuisances"][col][stat] for r in rows if col in r["nuisances"]])),
                             "real_reference": float(np.nanmean([r["reference"]["nuisances"][col][stat] for r in rows
                                                                 if col in r["nuisances"]]))}
                      for stat in ("w1", "spread_ratio")}
                for col in columns if any(col in r["nuisances"] for r in rows)}
    return {"per_set_mean": mean, "nuisance": nuisance}


def eval_summary(ev: dict) -> dict:
    """The numbers an experiment keeps from an evaluation: accuracy, defects, and each distance beside its
    real-vs-real reference; the per-set diversity where the evaluation had every attribute fixed."""
    out = {k: ev[k] for k in ("attr_accuracy", "all_attributes_correct", "defect_rate")}
    if "all_attributes_correct_real_reference" in ev:  # evaluations before it was measured lack it
        out["all_attributes_correct_real_reference"] = ev["all_attributes_correct_real_reference"]
    for k in ("fd", "kid", "recall", "coverage", "precision"):
        out[k], out[f"{k}_real_reference"] = ev[k]["value"], ev[k]["real_reference"]
    for k, v in ev.get("per_set_mean", {}).items():
        out[f"set_{k}"], out[f"set_{k}_real_reference"] = v["value"], v["real_reference"]
    if "memorisation" in ev:
        mem = ev["memorisation"]
        out["auth_pct"], out["auth_pct_real_reference"] = mem["auth_pct"]["value"], mem["auth_pct"]["real_reference"]
        out["nearest_is_own_training_row"] = mem["nearest_is_own_training_row"]
    return out
