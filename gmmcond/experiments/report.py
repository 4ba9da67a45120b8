"""Markdown tables from the experiments' JSON files, so the results tables are regenerated, never typed:
``python launch/reproduce.py report`` prints every table whose JSON exists under runs/reproduce."""
from __future__ import annotations

import json
from pathlib import Path


def pm(stat: dict, digits: int = 3) -> str:
    """Format a {mean, std, n} summary as 'mean +- std'."""
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def ngmg_table(result: dict) -> str:
    losses = ("bce", "ngmg_surplus", "ngmg_deficit")
    lines = [f"test SSE after {result['steps']} steps, mean +- std over {result['seeds']} seeds (log-W1 in brackets); "
             f"rare: '{result['rare_attr']}' in {result['rare_fraction']:.0%} of training images",
             "", "| setting | lr | " + " | ".join(losses) + " |", "|---|---|" + "---|" * len(losses)]
    for setting, by_lr in result["settings"].items():
        for lr, arms in by_lr.items():
            cells = [f"{pm(arms[l]['final_sse'])} ({arms[l]['final_log_w1']['mean']:.2f})" for l in losses]
            lines.append(f"| {setting} | {float(lr):g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ARM_COLUMNS = (("shared_accuracy", "shape+colour accuracy", 4), ("shape_accuracy", "shape accuracy", 4),
               ("attr_accuracy", "accuracy", 4), ("defect_rate", "defects", 3), ("recall", "recall", 3),
               ("coverage", "coverage", 3), ("fd", "FD", 1), ("set_mean_spread_ratio", "spread ratio", 3),
               ("last100", "loss (last 100)", 4))


# the headline numbers first (conformity, defects, the per-set diversity), then the whole-set ones and the loss;
# a column none of the arms has is left out, so older JSON (no per-set metrics) still tabulates
HEADLINE_ARM_COLUMNS = (("all_attributes_correct", "conformity", 3), ("shared_accuracy", "shape+colour accuracy", 3),
                        ("shape_accuracy", "shape accuracy", 3), ("attr_accuracy", "accuracy", 3),
                        ("defect_rate", "defects", 3), ("set_recall", "per-set recall", 3),
                        ("set_coverage", "per-set coverage", 3), ("set_mean_spread_ratio", "per-set spread", 3),
                        ("recall", "recall", 3), ("coverage", "coverage", 3), ("fd", "FD", 1),
                        ("last100", "loss (last 100)", 4), ("head_share", "head's share of the objective", 3))


# Fig. 9's "faster convergence": the diffusion loss along the way, and when (whether) the no-head arm's final
# loss is reached (gmmcond.experiments.reproduce.convergence)
CONVERGENCE_COLUMNS = (("head_share", "head's share", 3), ("loss_at_25pct", "loss at 25%", 4),
                       ("loss_at_50pct", "loss at 50%", 4), ("last100", "loss (last 100)", 4),
                       ("reaches_base_final", "reaches no-head final (share of seeds)", 2),
                       ("steps_to_base_final", "step it does", 0))


def arms_table(result: dict, columns=ARM_COLUMNS) -> str:
    """One row per arm: mean +- std over seeds of each column the arm has; real-vs-real references last."""
    arms = result["arms"]
    if not arms:
        return "(no arm has a finished seed yet)"
    cols = [c for c in columns if any(c[0] in a for a in arms.values())]
    lines = ["| arm | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, stats in arms.items():
        n = next(v["n"] for v in stats.values() if isinstance(v, dict) and "n" in v)
        cells = [pm(stats[k], d) if k in stats else "-" for k, _, d in cols]
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    refs = [c for c in cols if any(f"{c[0]}_real_reference" in a for a in arms.values())]
    if refs:
        first = next(iter(arms.values()))
        cells = [pm(first[f"{k}_real_reference"], d) if f"{k}_real_reference" in first else "-" for k, _, d in cols]
        lines.append("| real vs real (reference) | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_table(*results: dict) -> str:
    """The combination experiment's budget curve (issue 42): one row per arm and training length, from runs of the
    same split at several ``--steps`` (one result each), ordered by arm and steps: seen and held-out conformity, the
    ratio of their means, and held-out defects, so the table says how much of the gap more training closes. Only
    arms measured at more than one length are drawn (the recipe-length results hold every other arm too)."""
    lengths: dict[str, set] = {}
    for r in results:
        for arm in r["arms"]:
            lengths.setdefault(arm, set()).add(r["steps"])
    rows = sorted(((arm, r["steps"], stats) for r in results for arm, stats in r["arms"].items()
                   if len(lengths[arm]) > 1), key=lambda t: (t[0], t[1]))
    lines = ["| arm | steps | seeds | conformity seen | conformity held-out | held-out / seen | defects held-out |",
             "|---|---:|---:|---|---|---:|---|"]
    for arm, steps, stats in rows:
        seen, held = stats["conformity_seen"], stats["conformity_held_out"]
        ratio = f"{held['mean'] / seen['mean']:.2f}x" if seen["mean"] else "-"
        lines.append(f"| {arm} | {steps} | {seen['n']} | {pm(seen)} | {pm(held)} | {ratio} | "
                     f"{pm(stats['defects_held_out'])} |")
    return "\n".join(lines)


def paired_table(result: dict, columns=HEADLINE_ARM_COLUMNS) -> str:
    """Each arm minus the first arm, paired by seed: mean +- std (n - 1) of the per-seed differences over the seeds
    both ran, and on how many of them the difference is positive. Seed-to-seed variation shared by both arms
    (a harder seed for every arm) cancels here, which the unpaired table's spread cannot show."""
    from .runner import summarise

    arms = result["arms"]
    names = list(arms)
    if len(names) < 2:
        return ""
    base = {r["seed"]: r for r in arms[names[0]].get("per_seed", [])}
    lines = []
    for arm in names[1:]:
        pairs = [(r, base[r["seed"]]) for r in arms[arm].get("per_seed", []) if r["seed"] in base]
        cells = []
        for key, head, digits in columns:
            d = [a[key] - b[key] for a, b in pairs if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float))]
            if d:
                stat = summarise(d)
                cells.append((head, f"{stat['mean']:+.{digits}f} +- {stat['std']:.{digits}f} ({sum(x > 0 for x in d)} of {len(d)} > 0)"))
        if cells:
            if not lines:
                lines = [f"paired by seed, each arm minus '{names[0]}': mean +- std of the per-seed differences", ""]
            lines += ["| arm | seeds | " + " | ".join(h for h, _ in cells) + " |", "|---|---|" + "---|" * len(cells),
                      f"| {arm} | {len(pairs)} | " + " | ".join(c for _, c in cells) + " |", ""]
    return "\n".join(lines).rstrip()


COMBINATION_COLUMNS = (("conformity_seen", "conformity seen", 3), ("conformity_held_out", "conformity held-out", 3),
                       ("conformity_ratio", "held-out / seen", 3), ("defects_seen", "defects seen", 3),
                       ("defects_held_out", "defects held-out", 3), ("spread_seen", "spread seen", 3),
                       ("spread_held_out", "spread held-out", 3), ("unspecified_tv_max", "max TV unspecified", 3),
                       ("negation_conformity", "negation conformity", 3), ("jsd_triangle_red", "JSD triangle-red", 4),
                       ("jsd_circle_red", "JSD circle-red", 4))


# issue 38: what an open attribute means, measured (the combination experiment's arms that leave features open)
OPEN_ARMS = {"features joint": "plain model, whole test rows named",
             "features, open from data": "plain model, open=data",
             "features + attr_dropout, all specified": "attr_dropout 0.25, whole test rows named",
             "features + attr_dropout, open from data": "attr_dropout 0.25, open=data",
             "features + attr_dropout joint": "attr_dropout 0.25, open=model"}
OPEN_COLUMNS = (("conformity_seen", "conformity seen", 3), ("conformity_held_out", "conformity held-out", 3),
                ("free_error_seen", "free-attribute error seen", 3), ("free_floor_seen", "real floor seen", 3),
                ("free_error_held_out", "free-attribute error held-out", 3), ("free_floor_held_out", "real floor held-out", 3),
                ("defects_seen", "defects seen", 3), ("defects_held_out", "defects held-out", 3),
                ("spread_seen", "spread seen", 3), ("spread_held_out", "spread held-out", 3),
                ("negation_conformity", "negation (pairs)", 3), ("single_negation_conformity", "single negation", 3),
                ("single_negation_error", "single-negation share error", 3),
                ("single_negation_floor", "its real floor", 3))
# each open=data arm against the same model with whole rows named (paired by seed)
OPEN_PAIRS = (("features, open from data", "features joint"),
              ("features + attr_dropout, open from data", "features + attr_dropout, all specified"))


def _per_seed(arm: dict, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in arm.get("per_seed", []) if isinstance(r.get(key), (int, float))}


def open_table(result: dict) -> str:
    """Issue 38's table and its targets, from the combination experiment's JSON: per arm mean +- std over seeds,
    then each target met or missed (free-attribute error <= 1.5x the real floor; a partial request's seen
    conformity within 0.02 of the same model's with whole rows, paired by seed; negation >= 0.95; a single
    negation's colour shares within their real floor)."""
    from .runner import summarise

    arms = {a: result["arms"][a] for a in OPEN_ARMS if a in result.get("arms", {})}
    if not any("free_error_seen" in a for a in arms.values()):
        return ""
    cols = [c for c in OPEN_COLUMNS if any(c[0] in a for a in arms.values())]
    lines = ["| arm | asked | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for arm, stats in arms.items():
        n = next(v["n"] for v in stats.values() if isinstance(v, dict) and "n" in v)
        lines.append(f"| {arm} | {OPEN_ARMS[arm]} | {n} | "
                     + " | ".join(pm(stats[k], d) if k in stats else "-" for k, _, d in cols) + " |")
    lines += ["", "Targets (mean +- std over seeds of the per-seed value):", ""]
    for arm, stats in arms.items():
        if "free_error_seen" not in stats:
            continue
        for split in ("seen", "held_out"):
            err, floor = _per_seed(stats, f"free_error_{split}"), _per_seed(stats, f"free_floor_{split}")
            ratio = summarise([err[s] / floor[s] for s in err if floor.get(s)])
            verdict = "met" if ratio["mean"] <= 1.5 else f"missed by {ratio['mean'] - 1.5:.2f}x"
            lines.append(f"- {arm}, {split.replace('_', '-')}: free-attribute error / real floor {pm(ratio, 2)} "
                         f"(target <= 1.5): {verdict}")
        if "negation_conformity" in stats:
            neg = stats["negation_conformity"]
            lines.append(f"- {arm}: negation conformity {pm(neg)} (target >= 0.95): "
                         + ("met" if neg["mean"] >= 0.95 else f"missed by {0.95 - neg['mean']:.3f}"))
        if "single_negation_error" in stats:
            err, floor = _per_seed(stats, "single_negation_error"), _per_seed(stats, "single_negation_floor")
            d = summarise([err[s] - floor[s] for s in err if s in floor])
            lines.append(f"- {arm}: single negation, colour-share error minus its real floor {d['mean']:+.3f} +- "
                         f"{d['std']:.3f} (target <= 0): " + ("met" if d["mean"] <= 0 else f"missed by {d['mean']:.3f}"))
    for arm, base in OPEN_PAIRS:
        if arm in arms and base in arms:
            a, b = _per_seed(arms[arm], "conformity_seen"), _per_seed(arms[base], "conformity_seen")
            diff = [a[s] - b[s] for s in a if s in b]
            if diff:
                d = summarise(diff)
                lines.append(f"- {arm} minus {base}, seen conformity paired by seed ({len(diff)} seeds): "
                             f"{d['mean']:+.3f} +- {d['std']:.3f} (target >= -0.02): "
                             + ("met" if d["mean"] >= -0.02 else f"missed by {-0.02 - d['mean']:.3f}"))
    return "\n".join(lines)


DISTRIBUTION_COLUMNS = (("all_attributes_correct", "conformity", 3), ("defect_rate", "defects", 3),
                        ("set_recall", "per-set recall", 3), ("set_coverage", "per-set coverage", 3),
                        ("set_mean_spread_ratio", "per-set spread", 3), ("attr_accuracy", "accuracy", 4),
                        ("auth_pct", "AuthPct", 1), ("nearest_is_own_training_row", "nearest = own row", 3),
                        ("last100", "loss (last 100)", 4))


def sweep_table(result: dict) -> str:
    """One row per (sampler, scale): conformity and defects first, then the per-set and whole-set numbers."""
    nan = float("nan")
    lines = [f"one run ({result['run']}), n = {result['n']}, {result['sets']} attribute sets x {result['per_set']} for the spread",
             "", "| sampler | cfg | conformity | defects | per-set recall | per-set coverage | spread ratio | accuracy | recall | coverage |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        lines.append(f"| {p['sampler']} | {p['cfg_scale']:g} | {p.get('all_attributes_correct', nan):.3f} | {p['defect_rate']:.3f} | "
                     f"{p.get('set_recall', nan):.3f} | {p.get('set_coverage', nan):.3f} | "
                     f"{p.get('set_mean_spread_ratio', nan):.3f} | {p['attr_accuracy']:.4f} | {p['recall']:.3f} | {p['coverage']:.3f} |")
    if result["points"]:
        ref = result["points"][0]["references"]
        lines.append(f"| real vs real | | | | {ref.get('set_recall', nan):.3f} | {ref.get('set_coverage', nan):.3f} | "
                     f"{ref.get('set_mean_spread_ratio', nan):.3f} | | {ref.get('recall', nan):.3f} | {ref.get('coverage', nan):.3f} |")
    return "\n".join(lines)


RECIPE_COLUMNS = (("sec_per_step", "sec/step", 3), ("attr_accuracy", "accuracy", 4), ("shape_accuracy", "shape accuracy", 3),
                  ("defect_rate", "defects", 3), ("recall", "recall", 3), ("coverage", "coverage", 3), ("fd", "FD", 1),
                  ("set_mean_spread_ratio", "spread ratio", 3))


def recipe_table(runs: list[Path]) -> str:
    """One row: mean +- std over ``runs`` (seeds of one recipe) of each run's ``eval.json`` and its median
    training step time; the real-vs-real references below it."""
    from ..eval.evaluate import eval_summary
    from ..io import median_sec_per_step, read_json, read_metrics
    from .reproduce import shape_accuracy
    from .runner import summarise_records

    recs = []
    for run in runs:
        ev = read_json(run / "eval.json")
        recs.append({**eval_summary(ev), "sec_per_step": median_sec_per_step(read_metrics(run / "metrics.jsonl")),
                     "shape_accuracy": shape_accuracy(ev["per_attribute"])})
    stats = summarise_records(recs)
    return f"runs: {', '.join(map(str, runs))}\n\n" + arms_table({"arms": {"default recipe": stats}}, RECIPE_COLUMNS)


EDIT_COLUMNS = (("requested_right", "requested right", 3), ("unrequested_kept", "unrequested kept", 3),
                ("all_right", "all right", 3), ("defects", "defects", 3), ("cx_abs_delta", "Δcx", 3),
                ("cy_abs_delta", "Δcy", 3), ("radius_abs_delta", "Δradius", 3), ("rotation_abs_delta", "Δrotation", 3),
                ("cx_w1", "W1 cx", 3), ("cy_w1", "W1 cy", 3), ("radius_w1", "W1 radius", 3), ("rotation_w1", "W1 rotation", 3))


def editing_table(result: dict) -> str:
    """The edit scores, one row per method and kind, and the inversion's reconstruction error per iteration count."""
    c = result["config"]
    lines = [f"{c['n']} held-out shapes per seed, {c['seeds']} seeds (mean +- std), run {c['run']} at step {c['step']}, "
             f"{c['steps']} steps, cfg {c['cfg_scale']:g}, inversion with {c['iters']} fixed-point iterations; "
             "Δ: mean per-image |change| of a nuisance from the original, W1: between their distributions "
             "(the evaluator's regression; rotation as a fraction of the "
             "symmetry period, only where the shape is kept)", "",
             "| method / edit | " + " | ".join(h for _, h, _ in EDIT_COLUMNS) + " | most often lost |",
             "|---|" + "---|" * (len(EDIT_COLUMNS) + 1)]
    for arm, stats in result["edits"].items():
        lost = max((k for k in stats if k.startswith("lost_")), key=lambda k: stats[k]["mean"], default=None)
        worst = f"{lost[5:]} {stats[lost]['mean']:.3f}" if lost and stats[lost]["mean"] > 0 else "-"
        lines.append(f"| {arm} | " + " | ".join(pm(stats[k], d) if k in stats else "-" for k, _, d in EDIT_COLUMNS)
                     + f" | {worst} |")
    lines += ["", "| inversion, attributes unchanged | RMSE | max abs error | PSNR (dB) |", "|---|---|---|---|"]
    for arm, stats in result["reconstruct"].items():
        lines.append(f"| {arm} | {pm(stats['rmse'], 4)} | {pm(stats['max_abs'], 3)} | {pm(stats['psnr_db'], 1)} |")
    return "\n".join(lines)


def command_options(result: dict) -> str:
    """The options an experiment's JSON records (scale, steps, seeds), as they would follow its sub-command."""
    return "".join(f" --{k} {result[k]}" for k in ("scale", "steps", "seeds") if k in result)


def _headline(result: dict) -> str:
    return "\n\n".join(filter(None, (arms_table(result, HEADLINE_ARM_COLUMNS), paired_table(result))))


EXPERIMENT_TABLES = {  # experiment name -> its markdown table(s) from its result JSON
    "ngmg-vs-bce": ngmg_table, "head": _headline, "features-vs-classes": _headline, "precision": arms_table,
    "combinations": lambda r: "\n\n".join(filter(None, (arms_table(r, COMBINATION_COLUMNS), open_table(r)))),
    "editing": editing_table, "distribution": lambda r: arms_table(r, DISTRIBUTION_COLUMNS)}


def report(out: Path, sweep_json: Path | None = None, recipe_runs: list[Path] | None = None) -> str:
    """Every table whose JSON exists under ``out`` (and the sweep's and the recipe runs', if given), as one
    markdown string."""
    parts = []
    if recipe_runs:
        parts.append(f"### the default recipe (`python launch/evaluate.py --run RUN` per seed)\n\n{recipe_table(recipe_runs)}")
    for name, fn in EXPERIMENT_TABLES.items():
        path = out / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            parts.append(f"### {name} (`python launch/reproduce.py {name}{command_options(result)}`)\n\n{fn(result)}")
    if sweep_json and sweep_json.exists():
        parts.append(f"### sweep (`python launch/evaluate.py --run RUN --sweep`)\n\n{sweep_table(json.loads(sweep_json.read_text()))}")
    return "\n\n".join(parts)
