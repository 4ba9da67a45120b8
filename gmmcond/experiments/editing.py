"""How well edits keep what they were not asked to change: ``python launch/reproduce.py editing --run RUN``.

Held-out shapes (the test split, never trained on) are edited by one attribute: their colour (to the next
colour), their shape (to the next shape) or one appearance feature (dark_bg or outline flipped, which
moves no geometry). The frozen evaluator scores every edit:

* requested right: the changed attributes read as asked;
* unrequested kept: every other attribute reads as in the original;
* all right: both (the edit's conformity); defects by the renderer's rule;
* nuisances kept: the evaluator's regressed centre, radius and rotation of the edit against the original's,
  paired (mean |delta| per image) and as distributions (W1). Rotation only where the shape is kept and is
  not a circle, as a fraction of the shape's symmetry period.

``oracle`` (the renderer drawing the original's exact geometry with the target attributes) is the floor
of the measurement (the evaluator's own regression noise); ``generate`` (fresh samples of the target
attributes with the run's sampler) is what a method that keeps nothing scores; ``reconstruct`` is the
inversion with unchanged attributes (its pixel error, and what the fixed-point iterations buy).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from ..data.shapes import COLOURS, NUISANCE_COLUMNS, PERIOD, SHAPES, check_image
from ..errors import RunError
from ..io import ResultLog
from ..sampling import generate
from ..sampling.edit import edit_by_inversion, sdedit
from ..sampling.settings import SamplingSettings
from .runner import Options, experiment, summarise

EDIT_KINDS = ("colour", "shape", "feature")
EDIT_METHODS = {"invert": ("invert", 1.0), "sdedit 0.5": ("sdedit", 0.5),
                "sdedit 0.7": ("sdedit", 0.7), "generate": ("generate", None), "oracle": ("oracle", None)}
RECONSTRUCT_ITERS = (0, 3)
KEPT_NUISANCES = {c: NUISANCE_COLUMNS.index(c) for c in ("cx", "cy", "radius")}  # columns of the evaluator's regression
KEY = ("run", "step", "seed", "n", "method", "kind", "steps", "cfg_scale", "iters")


def edit_targets(attrs: torch.Tensor, kind: str, names: list[str]) -> torch.Tensor:
    """The target rows of one kind of edit of ``attrs`` [B, K] (see the module docstring)."""
    out = attrs.clone()
    if kind in ("colour", "shape"):
        group = list(COLOURS if kind == "colour" else SHAPES)
        cols = [names.index(g) for g in group]
        now = attrs[:, cols].argmax(1)
        out[:, cols] = 0
        out[torch.arange(len(attrs)), torch.tensor(cols)[(now + 1) % len(cols)]] = 1
    elif kind == "feature":
        for i in range(len(attrs)):
            k = names.index("dark_bg" if i % 2 == 0 else "outline")
            out[i, k] = 1 - attrs[i, k]
    else:
        raise ValueError(f"unknown edit kind '{kind}'; choose from {', '.join(EDIT_KINDS)}")
    return out


def oracle_params(test, index: int, kind: str, row: int):
    """Held-out item ``index``'s parameters with the geometry kept and the attributes of edit ``kind`` (``row`` as
    in :func:`edit_targets`): the exact edit, which only the renderer can make."""
    p = test.params(index)
    if kind == "colour":
        p = dataclasses.replace(p, colour=COLOURS[(COLOURS.index(p.colour) + 1) % len(COLOURS)])
    elif kind == "shape":
        shape = SHAPES[(SHAPES.index(p.shape) + 1) % len(SHAPES)]
        p = dataclasses.replace(p, shape=shape, angle=p.angle % PERIOD[shape] if PERIOD[shape] else 0.0)
    else:
        flip = "dark_bg" if row % 2 == 0 else "outline"
        p = dataclasses.replace(p, **{flip: not getattr(p, flip)})
    return p


def rotation_fraction(nuisances: torch.Tensor) -> torch.Tensor:
    """The regressed rotation as a fraction of the symmetry period, in [0, 1)."""
    return (torch.atan2(nuisances[:, 4], nuisances[:, 3]) / (2 * math.pi)) % 1.0


def edit_scores(evaluator, check_image, names: list[str], original: torch.Tensor, edited: torch.Tensor,
                source: torch.Tensor, target: torch.Tensor) -> dict:
    """Score edits of ``original`` into ``edited`` (source and target attribute rows [B, K])."""
    po, pe = evaluator.predict(original), evaluator.predict(edited)
    read = (pe["probs"] > 0.5).float()
    changed = source != target
    requested = ((read == target) | ~changed).all(1)
    kept = ((read == source) | changed).all(1)
    out = {"requested_right": requested.float().mean().item(), "unrequested_kept": kept.float().mean().item(),
           "all_right": (read == target).all(1).float().mean().item(),
           "defects": float(np.mean([check_image(img, t).defect for img, t in zip(edited, target)]))}
    for k, name in enumerate(names):  # how often each attribute the edit did not ask to change was lost
        unchanged = ~changed[:, k]
        if unchanged.any():
            out[f"lost_{name}"] = (read[unchanged, k] != source[unchanged, k]).float().mean().item()
    no, ne = po["nuisances"], pe["nuisances"]
    for name, col in KEPT_NUISANCES.items():
        out[f"{name}_abs_delta"] = (ne[:, col] - no[:, col]).abs().mean().item()
        out[f"{name}_w1"] = float(wasserstein_distance(ne[:, col].numpy(), no[:, col].numpy()))
    shapes = [names.index(s) for s in SHAPES]
    rotating = (source[:, shapes] == target[:, shapes]).all(1) & (source[:, names.index("circle")] < 0.5)
    if rotating.any():
        ro, re = rotation_fraction(no[rotating]), rotation_fraction(ne[rotating])
        d = (re - ro).abs()
        out["rotation_abs_delta"] = torch.minimum(d, 1 - d).mean().item()
        out["rotation_w1"] = float(wasserstein_distance(re.numpy(), ro.numpy()))
    return out


def _held_out(dataset_cfg: dict, n: int, offset: int):
    from ..registry import DATASETS

    test = DATASETS.build({**dataset_cfg, "split": "test"})
    items = [test[i] for i in range(offset, offset + n)]
    return test, torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


@experiment("editing", takes=("run", "seeds", "steps", "n", "cfg_scale"), defaults={"seeds": 3, "n": 128})
def editing(opts: Options, *, iters: int = 3) -> dict:
    """Edit ``opts.n`` held-out images per seed (different images per seed) with every method and kind, with the
    run ``opts.run`` (its sampler at ``opts.steps`` steps and guidance ``opts.cfg_scale``, default its own); resumable
    through OUT/editing.jsonl."""
    from ..eval.evaluator import evaluator_for
    from ..modeling.runs import load_run

    if opts.run is None:
        raise RunError("editing needs --run RUN, a run trained on the shapes data (e.g. by launch/train.py --config shapes)")
    run_dir, n, seeds = Path(opts.run), opts.n, opts.seeds
    run = load_run(run_dir)
    parts, cfg, names = run.parts, run.cfg, run.parts.attr_names
    if cfg["dataset"]["type"] != "shapes" or cfg["dataset"].get("label_mode", "features") != "features":
        raise RunError(f"the editing experiment needs a run on the shapes data with feature labels (the default "
                       f"recipe); {run_dir} has {cfg['dataset']['type']} data")
    evaluator, _, _ = evaluator_for(cfg["dataset"])
    s = cfg["sample"]
    steps = opts.steps or s["steps"]
    cfg_scale = s["cfg_scale"] if opts.cfg_scale is None else opts.cfg_scale
    settings = lambda seed: SamplingSettings.of_run(cfg, {"steps": steps, "seed": seed, "cfg_scale": cfg_scale})  # noqa: E731
    log = ResultLog(opts.path("editing", "jsonl"))
    base = {"run": str(run_dir), "step": run.step, "n": n, "steps": steps, "cfg_scale": cfg_scale}
    for seed in range(seeds):
        test, images, attrs = _held_out(cfg["dataset"], n, seed * n)
        for iters_r in RECONSTRUCT_ITERS:
            def reconstruct(seed=seed, iters_r=iters_r, images=images, attrs=attrs) -> dict:
                rec = edit_by_inversion(parts, images, attrs, attrs, settings(seed), iters=iters_r)
                err = (rec - images).float()
                out = {"rmse": err.pow(2).mean().sqrt().item(), "max_abs": err.abs().max().item(),
                       "psnr_db": (10 * torch.log10(4 / err.pow(2).mean())).item()}
                opts.progress(f"seed {seed} reconstruct iters {iters_r}: rmse {out['rmse']:.4f}")
                return out

            log.once({**base, "seed": seed, "method": "reconstruct", "kind": "none", "iters": iters_r}, reconstruct)
        for method, (how, strength) in EDIT_METHODS.items():
            for kind in EDIT_KINDS:
                def edit(seed=seed, method=method, how=how, strength=strength, kind=kind, test=test, images=images,
                         attrs=attrs) -> dict:
                    target = edit_targets(attrs, kind, names)
                    if how == "oracle":
                        edited = torch.stack([test.image(oracle_params(test, seed * n + i, kind, i)) for i in range(n)])
                    else:
                        edited = edit_with(parts, settings(seed), how, strength, images, attrs, target, iters=iters)
                    scores = edit_scores(evaluator, check_image, names, images, edited.float(), attrs, target)
                    opts.progress(f"seed {seed} {method} {kind}: requested {scores['requested_right']:.3f} "
                                  f"kept {scores['unrequested_kept']:.3f} |dcx| {scores['cx_abs_delta']:.3f}")
                    return scores

                key = {**base, "seed": seed, "method": method, "kind": kind, "iters": iters if how == "invert" else 0}
                log.once(key, edit)
    _, images, attrs = _held_out(cfg["dataset"], 10, 0)
    figure(opts.path("editing", "png"), parts, settings(0), images, attrs, names, iters=iters)
    return summarise_editing(log, base, seeds, iters)


def edit_with(parts, settings: SamplingSettings, how: str, strength, images, attrs, target, *, iters: int):
    """Edit ``images`` from ``attrs`` to ``target`` by one method of ``EDIT_METHODS`` with the run's sampling settings."""
    if how == "invert":
        return edit_by_inversion(parts, images, attrs, target, settings, strength=strength, iters=iters)
    if how == "sdedit":
        return sdedit(parts, images, target, settings, strength=strength)
    if how == "oracle":
        raise ValueError("the oracle edit is rendered, not sampled: use oracle_edit")
    return generate(parts, target, settings)


def figure(path: Path, parts, settings: SamplingSettings, images, attrs, names, *, iters: int, k: int = 10) -> None:
    """A grid per edit kind: the originals, then each method's edit of them."""
    from ..visualize import captioned_grid, save_png

    rows, captions = [], []
    for kind in ("colour", "shape"):
        target = edit_targets(attrs[:k], kind, names)
        rows.append(images[:k])
        captions.append(f"held-out originals; below, each method's {kind} edit")
        for method, (how, strength) in EDIT_METHODS.items():
            if how == "oracle":
                continue
            rows.append(edit_with(parts, settings, how, strength, images[:k], attrs[:k], target, iters=iters).float())
            captions.append(method)
    save_png(captioned_grid(rows, captions), path)


def summarise_editing(log: ResultLog, base: dict, seeds: int, iters: int) -> dict:
    """Mean +- std over seeds of every score, per method and kind, and of the reconstruction errors."""
    result = {"config": {**base, "seeds": seeds, "iters": iters}, "edits": {}, "reconstruct": {}}
    for method, (how, _) in EDIT_METHODS.items():
        for kind in EDIT_KINDS:
            rs = [log.done(KEY, **base, seed=sd, method=method, kind=kind, iters=iters if how == "invert" else 0)
                  for sd in range(seeds)]
            rs = [r for r in rs if r]
            if rs:
                fields = [f for f in rs[0] if f not in KEY and all(f in r for r in rs)]
                result["edits"][f"{method} / {kind}"] = {f: summarise([r[f] for r in rs]) for f in fields}
    for it in RECONSTRUCT_ITERS:
        rs = [log.done(KEY, **base, seed=sd, method="reconstruct", kind="none", iters=it) for sd in range(seeds)]
        rs = [r for r in rs if r]
        if rs:
            result["reconstruct"][f"iters {it}"] = {f: summarise([r[f] for r in rs]) for f in ("rmse", "max_abs", "psnr_db")}
    return result
