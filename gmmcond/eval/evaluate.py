"""Offline evaluation without downloaded weights: attribute accuracy, defects, quality and diversity.

Samples are conditioned on the attribute rows of a held-out real set A and compared with A in the
evaluator's features (:mod:`gmmcond.eval.evaluator`); every distance is reported beside its real-vs-real
reference, a second real set B with the SAME attribute rows (for shapes each row redrawn with fresh
nuisances; elsewhere the next held-out images, an approximation). Accuracy and defects alone reward
collapse, so each report pairs them with recall, coverage and, per attribute set, the nuisance spread.

Each dataset brings what it knows through one protocol (:func:`heldout_sets`). On ``shapes`` defects are
the renderer's own rule (:func:`gmmcond.data.shapes.check_image`: plain background, one connected object
of the requested size class, round second moments, a palette fill), beside the evaluator's confidence.
For datasets without such a rule, a sample is a defect when the evaluator is unsure within a mutually exclusive group or when its features
lie farther from every real image than 99% of real held-out images do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DatasetError


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


def stack_items(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``n`` images and attributes of a dataset as two tensors."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


def attribute_scores(probs: torch.Tensor, attrs: torch.Tensor, names: list[str]) -> dict:
    """Per-attribute accuracy, its mean, and the all-attributes-correct rate."""
    correct = (probs > 0.5).float() == attrs
    per = {n: correct[:, k].float().mean().item() for k, n in enumerate(names)}
    return {"per_attribute": per, "mean_accuracy": correct.float().mean().item(), "all_correct": correct.all(1).float().mean().item()}


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


def heldout_sets(dataset_cfg: dict):
    """Return the held-out split in the run's labelling (its rows condition the samples) and in the evaluator's.

    Every registered dataset takes ``split="test"``. A dataset may adapt further through the evaluation
    protocol below (shapes: excluded attribute sets come back, labels become the 11 features).

    The evaluation protocol, every method optional:
        ``for_evaluation() -> (cond_set, eval_set)``: the two views above, row for row;
        ``check_image(image, attrs) -> verdict with .defect, .reason``: a renderer's defect rule;
        ``redraw(index, stream) -> params`` and ``image(params)``: the same attribute row with fresh
        nuisances, for an exact real-vs-real reference and the per-set diversity metrics;
        ``groups``: mutually exclusive attribute groups;
        ``known_features``: where the run's labels are not the evaluator's (shapes classes), the evaluator
        attributes a label fixes; the targets are then the evaluation view's rows.
    """
    from ..registry import DATASETS

    test = DATASETS.build(dict(dataset_cfg, split="test"))
    return test.for_evaluation() if hasattr(test, "for_evaluation") else (test, test)


def defect_flags(images: torch.Tensor, probs: torch.Tensor, target: torch.Tensor, known: torch.Tensor, names: list[str],
                 groups: list[list[str]], check_image=None, feats: torch.Tensor | None = None,
                 real_feats: torch.Tensor | None = None) -> list[str]:
    """Return a reason per image ("ok" if none). Where the dataset has a ``check_image`` rule (shapes: the
    renderer's), that rule alone decides; an unsure evaluator is reported beside it (:func:`unsure_rate`),
    not counted as a defect, since it can only fire where a requested attribute is already wrong. Without
    such a rule: far from every real image, or an unsure evaluator within a mutually exclusive group."""
    if check_image is not None:
        reasons = []
        for img, t, kn in zip(images, target, known):
            check = check_image(img, t if kn.all() else None)  # a class run does not fix the size
            reasons.append(check.reason if check.defect else "ok")
        return reasons
    conf = group_confidence(probs, names, groups)
    real_nn = nearest_real_distance(real_feats, real_feats, exclude_self=True)
    far = nearest_real_distance(feats, real_feats) > torch.quantile(real_nn, 0.99)
    reasons = ["far from real data" if f else "ok" for f in far.tolist()]
    return [("unsure evaluator" if r == "ok" and c < 0.5 else r) for r, c in zip(reasons, conf.tolist())]


def unsure_rate(probs: torch.Tensor, names: list[str], groups: list[list[str]]) -> float:
    """The fraction of images whose most likely member of some mutually exclusive group has p < 0.5."""
    return (group_confidence(probs, names, groups) < 0.5).float().mean().item()


def real_sets(test, eval_set, n: int):
    """Return set A (the first ``n`` held-out images and the run's attribute rows that condition the samples),
    the real reference B, A's rows in the evaluator's labels, and a description of B: B has A's rows with
    fresh nuisances where the dataset can redraw (shapes), else it is the next ``n`` held-out images."""
    if len(test) < n:
        raise DatasetError(f"the held-out split has {len(test)} images, fewer than n={n}; lower --n")
    real_x, cond_attrs = stack_items(test, n)
    if hasattr(eval_set, "redraw"):
        ref_x = torch.stack([eval_set.image(eval_set.redraw(i)) for i in range(n)])
        return real_x, cond_attrs, ref_x, stack_items(eval_set, n)[1], "same attribute rows, nuisances redrawn"
    if len(test) < 2 * n:
        raise DatasetError(f"the held-out split has {len(test)} images; the reference needs 2n = {2 * n}; lower --n")
    ref_x = torch.stack([test[n + i][0] for i in range(n)])
    return real_x, cond_attrs, ref_x, cond_attrs, "the next n held-out images (attribute rows not matched)"


def requested(test, run_names: list[str], names: list[str], cond_attrs, real_y, exact_reference: bool):
    """What each sample was asked for, in the evaluator's attributes, and which of those the request fixes:
    the run's row itself, or (a class labelling such as shapes' classes) the same row of the evaluation view,
    masked to the attributes the label fixes (the dataset's ``known_features``)."""
    if run_names == names:
        return cond_attrs, torch.ones_like(cond_attrs)
    fixed = getattr(test, "known_features", None)
    if fixed is None or not exact_reference:
        raise DatasetError(f"the run's attributes {run_names[:4]}... differ from the evaluator's {names[:4]}... "
                           "and the dataset does not say how they map; pass --evaluator trained on the run's labels")
    return real_y, torch.tensor([float(nm in fixed) for nm in names]).expand_as(real_y)


def _sample(parts, attrs: torch.Tensor, *, sampler, steps: int, cfg_scale: float, seed: int, batch: int, precision: str,
            progress: bool, desc: str, latents: torch.Tensor | None = None) -> torch.Tensor:
    from tqdm.auto import tqdm

    from ..engine.precision import autocast
    from ..sampling.generate import generate

    device = next(parts.denoiser.parameters()).device
    out = []
    z = [None] * len(attrs.split(batch)) if latents is None else latents.split(batch)
    for i, chunk in enumerate(tqdm(attrs.split(batch), desc=desc, disable=not progress)):
        with autocast(device, precision):
            out.append(generate(parts, chunk, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed + i,
                                latents=z[i]).float())
    return torch.cat(out)


def eval_stem(tag: str | None) -> str:
    """The file stem an evaluation writes under: ``eval`` (eval.json, eval_worst.png, ...) or ``eval_TAG``."""
    return "eval" if tag is None else f"eval_{tag}"


def evaluate_run(run_dir: str | Path, *, n: int = 512, steps: int | None = None, sampler=None, cfg_scale: float | None = None,
                 seed: int = 0, batch: int = 64, progress: bool = True, evaluator: str | Path | None = None,
                 precision: str | None = None, sets: int = 6, per_set: int = 48, write: bool = True,
                 tag: str | None = None, checkpoint: str | Path | None = None, memorisation: int = MEMORISATION_N) -> dict:
    """Evaluate a trained run offline; writes ``eval.json``, ``eval_worst.png`` and ``eval_diversity.png``
    (``eval_TAG.json`` and so on with a ``tag``, so evaluations under other settings sit beside it).

    Args:
        n: samples conditioned on the attribute rows of the first ``n`` held-out real images (set A).
        evaluator: an evaluator file to use instead of the default (the frozen one for the default shapes data).
        sets, per_set: attribute sets (shapes) sampled ``per_set`` times each, against as many real redraws,
            for the per-set diversity metrics (recall, coverage, nuisance W1 and spread ratio).
        checkpoint: evaluate the EMA weights of this checkpoint instead of the run's newest weights.
        memorisation: samples conditioned on training rows for the memorisation check (:func:`memorisation_check`); 0 skips it.
    """
    from ..engine.precision import sampling_precision
    from ..engine.runs import load_run
    from ..io import write_json
    from ..visualize import captioned_grid, save_png
    from .evaluator import NUISANCE_COLUMNS, evaluator_for, matched_nuisances
    from .metrics import nuisance_fidelity, prdc, set_metrics

    if n <= 5 or (sets > 0 and per_set <= 5):
        raise ConfigError(f"evaluation needs n and per_set above 5 (the k-NN metrics use k = 5), got n={n}, per_set={per_set}")
    warnings = []
    if n < SMALL_N:
        warnings.append(f"n={n} is below {SMALL_N}: precision, recall, density, coverage (k-NN radii) and KID are not "
                        f"meaningful at this size; use --n {SMALL_N} or more")
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    run_dir = Path(run_dir)
    stem = eval_stem(tag)
    run = load_run(run_dir, checkpoint=checkpoint)
    cfg, parts = run.cfg, run.parts
    model, meta, evaluator_path = evaluator_for(cfg["dataset"], evaluator, progress=progress)
    names = list(meta["attr_names"])
    s = cfg["sample"]
    sampler, steps = sampler or s["sampler"], steps or s["steps"]
    cfg_scale = s["cfg_scale"] if cfg_scale is None else cfg_scale
    precision = precision or sampling_precision(cfg, next(parts.denoiser.parameters()).device.type)
    opts = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch=batch, precision=precision, progress=progress)

    test, eval_set = heldout_sets(cfg["dataset"])
    real_x, cond_attrs, ref_x, real_y, reference = real_sets(test, eval_set, n)
    exact_reference = hasattr(eval_set, "redraw")
    images = _sample(parts, cond_attrs, seed=seed, desc="sample", **opts)
    real, ref, fake = model.predict(real_x), model.predict(ref_x), model.predict(images)
    target, known = requested(test, list(parts.attr_names), names, cond_attrs, real_y, exact_reference)
    correct = ((fake["probs"] > 0.5).float() == target).float()
    per = {nm: (correct[:, k][known[:, k] > 0]).mean().item() for k, nm in enumerate(names) if known[:, k].any()}
    groups = [list(g) for g in getattr(eval_set, "groups", [])]
    check = getattr(eval_set, "check_image", None)
    reasons = defect_flags(images, fake["probs"], target, known, names, groups, check, fake["features"], real["features"])
    real_reasons = defect_flags(real_x, real["probs"], real_y, torch.ones_like(real_y), names, groups, check,
                                real["features"], ref["features"])
    defects = [r != "ok" for r in reasons]
    eig_min = torch.linalg.eigvalsh(torch.cov(real["features"].double().T)).min().item()
    vs_real, reference_vs_real = set_metrics(real["features"], fake["features"]), set_metrics(real["features"], ref["features"])
    result = {
        "run": str(run_dir), "step": run.step, "n": n, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
        "autocast": precision, "evaluator": str(evaluator_path), "evaluator_hash": meta.get("dataset_hash"),
        "evaluator_weights_sha256": meta["weights_sha256"],
        "evaluator_heldout": meta["scores"], "reference": reference,
        "attr_accuracy": (correct * known).sum().item() / known.sum().item(),
        "all_attributes_correct": ((correct * known).sum(1) == known.sum(1)).float().mean().item(),
        "per_attribute": per,
        "defect_rate": sum(defects) / len(defects),
        "defect_reasons": {r: reasons.count(r) for r in set(reasons) if r != "ok"},
        "real_heldout_defect_rate": sum(r != "ok" for r in real_reasons) / len(real_reasons),
        "unsure_rate": unsure_rate(fake["probs"], names, groups),  # beside the defects, not in them (shapes)
        **{key: {"value": vs_real[key], "real_reference": reference_vs_real[key]} for key in METRICS},
        "feature_dim": real["features"].shape[1], "feature_cov_min_eigenvalue": eig_min, "warnings": warnings,
    }
    if exact_reference and sets > 0 and bool(known.all()):  # per-set diversity needs every attribute fixed
        result["per_set"], diversity = _per_set(parts, eval_set, cond_attrs, model, names, sets, per_set, seed, opts,
                                                NUISANCE_COLUMNS, matched_nuisances, nuisance_fidelity, prdc)
        if write:
            save_png(captioned_grid(*diversity, cell=48), run_dir / f"{stem}_diversity.png")
        result["per_set_mean"] = {
            key: {"value": float(np.nanmean([r[key] for r in result["per_set"]])),
                  "real_reference": float(np.nanmean([r["reference"][key] for r in result["per_set"]]))}
            for key in ("recall", "coverage", "mean_spread_ratio", "mean_nuisance_w1")}
        result["nuisance"] = {
            col: {stat: {"value": float(np.nanmean([r["nuisances"][col][stat] for r in result["per_set"] if col in r["nuisances"]])),
                         "real_reference": float(np.nanmean([r["reference"]["nuisances"][col][stat] for r in result["per_set"]
                                                             if col in r["nuisances"]]))}
                  for stat in ("w1", "spread_ratio")}
            for col in NUISANCE_COLUMNS if any(col in r["nuisances"] for r in result["per_set"])}
    if memorisation:
        result["memorisation"], copies = memorisation_check(parts, cfg["dataset"], test, memorisation, seed, opts)
        if write:
            save_png(captioned_grid(*copies, cell=48), run_dir / f"{stem}_memorisation.png")
    result = {"headline": headline(result), **result}
    if write:
        conf = group_confidence(fake["probs"], names, groups)
        order = sorted(range(len(images)), key=lambda i: (not defects[i], conf[i].item()))[:32]
        rows = [images[order[j:j + 8]] for j in range(0, len(order), 8)]
        caps = [" | ".join(reasons[i][:14] for i in order[j:j + 8]) for j in range(0, len(order), 8)]
        save_png(captioned_grid(rows, caps, cell=64), run_dir / f"{stem}_worst.png")
        write_json(run_dir / f"{stem}.json", result)
    return result


def memorisation_check(parts, dataset_cfg: dict, test, m: int, seed: int, opts: dict) -> tuple[dict, tuple[list, list]]:
    """Do samples copy training images? ``m`` samples are conditioned on the first ``m`` training rows, each with
    the GMM latent that training paired with that row (``fixed_latents``; under fixed pairing the one channel
    through which a sample could recall its own training image); the first ``m`` held-out images are the
    reference. In pixel space, against the first ``MEMORISATION_TRAIN_MAX`` training images: the authenticity
    percentage (Alaa et al. 2022; a real held-out set scores its own level, copies score 0), the median
    distance to the nearest training image, and how often that image is the sample's own training row
    (beside its chance level: one over the number of training images with the same attribute row).
    Returns the numbers and a figure (samples, their nearest training images, their paired training rows)."""
    from ..registry import DATASETS
    from .metrics import authenticity

    train = DATASETS.build(dataset_cfg)  # the training split, as the run saw it
    k = min(len(train), MEMORISATION_TRAIN_MAX)
    m = min(m, k, len(test))
    train_x, train_attrs = stack_items(train, k)  # the first k only (the in-memory cache would render them all)
    cond = parts.conditioner
    index = torch.arange(m)
    latents = cond.fixed_latents(index) if cond.dim and hasattr(cond, "fixed_latents") else None
    images = _sample(parts, train_attrs[:m], seed=seed + 104729, desc="memorisation", latents=latents,
                     **{**opts, "progress": False})
    fake, real = authenticity(images, train_x), authenticity(stack_items(test, m)[0], train_x)
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


def _per_set(parts, eval_set, cond_attrs, model, names, sets, per_set, seed, opts, columns, matched, fidelity, prdc):
    """Per attribute set: ``per_set`` samples (fresh latents) against ``per_set`` real redraws, and a second
    real redraw as the reference; recall/coverage and nuisance W1 / spread ratio of each."""
    rows_seen, chosen = set(), []
    for i in range(len(cond_attrs)):
        key = tuple(cond_attrs[i].tolist())
        if key not in rows_seen:
            rows_seen.add(key)
            chosen.append(i)
        if len(chosen) == sets:
            break
    out, grid_rows, captions = [], [], []
    for j, i in enumerate(chosen):
        params = eval_set.params(i)
        label = ",".join(nm for nm, v in zip(names, eval_set[i][1].tolist()) if v > 0.5)
        real_x = torch.stack([eval_set.image(eval_set.redraw(i, 100 + r)) for r in range(per_set)])
        ref_x = torch.stack([eval_set.image(eval_set.redraw(i, 1000 + r)) for r in range(per_set)])
        attrs = cond_attrs[i].expand(per_set, -1).clone()
        fake_x = _sample(parts, attrs, seed=seed + 7919 * (j + 1), desc=f"set {j + 1}/{len(chosen)}", **{**opts, "progress": False})
        real, ref, fake = model.predict(real_x), model.predict(ref_x), model.predict(fake_x)
        shape_names = [params.shape] * per_set
        r_n, f_n, ref_n = (matched(x["nuisances"], shape_names) for x in (real, fake, ref))
        valid = [c for c in range(len(columns)) if not np.isnan(r_n[:, c]).any()]
        cols = [columns[c] for c in valid]

        def summary(other_feats, other_n):
            fid = fidelity(r_n[:, valid], other_n[:, valid], cols)
            pr = prdc(real["features"], other_feats)
            return {"recall": pr["recall"], "coverage": pr["coverage"], "precision": pr["precision"],
                    "nuisances": fid, "mean_spread_ratio": float(np.mean([v["spread_ratio"] for v in fid.values()])),
                    "mean_nuisance_w1": float(np.mean([v["w1"] for v in fid.values()]))}

        out.append({"attrs": label, **summary(fake["features"], f_n), "reference": summary(ref["features"], ref_n)})
        grid_rows += [fake_x[:8], real_x[:8]]
        captions += [f"samples: {label}", "real, same attributes"]
    return out, (grid_rows, captions)


def eval_summary(ev: dict) -> dict:
    """The numbers an experiment keeps from an evaluation: accuracy, defects, and each distance beside its
    real-vs-real reference; the per-set diversity where the evaluation had every attribute fixed."""
    out = {k: ev[k] for k in ("attr_accuracy", "all_attributes_correct", "defect_rate")}
    for k in ("fd", "kid", "recall", "coverage", "precision"):
        out[k], out[f"{k}_real_reference"] = ev[k]["value"], ev[k]["real_reference"]
    for k, v in ev.get("per_set_mean", {}).items():
        out[f"set_{k}"], out[f"set_{k}_real_reference"] = v["value"], v["real_reference"]
    if "memorisation" in ev:
        mem = ev["memorisation"]
        out["auth_pct"], out["auth_pct_real_reference"] = mem["auth_pct"]["value"], mem["auth_pct"]["real_reference"]
        out["nearest_is_own_training_row"] = mem["nearest_is_own_training_row"]
    return out
