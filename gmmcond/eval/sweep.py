"""Quality-diversity sweep: samplers x guidance scales on one trained run, each point evaluated the same way.

Accuracy and defects reward collapse; recall, coverage and the per-set nuisance spread ratio penalise it.
The sweep puts them side by side, so a recipe's default sampler and scale are chosen from numbers:
``python launch/evaluate.py --run RUN --sweep`` writes RUN/sweep.jsonl (resumable, one line per point),
RUN/sweep.json and RUN/sweep.png (accuracy against coverage, one line per sampler over the scales).
"""
from __future__ import annotations

from pathlib import Path

from ..io import ResultLog, write_json
from ..visualize import pyplot, save_figure

SWEEP_SAMPLERS = {
    "x0_reproject r=1": {"type": "x0_reproject", "renoise": 1.0},
    "x0_reproject r=0.5": {"type": "x0_reproject", "renoise": 0.5},
    "euler": {"type": "euler"},
    "dpmpp_2m": {"type": "dpmpp_2m"},
    "euler_ancestral": {"type": "euler_ancestral"},
}
SWEEP_SCALES = (1.0, 1.5, 2.0, 3.0)
KEPT = ("attr_accuracy", "all_attributes_correct", "defect_rate", "recall", "coverage", "precision", "fd",
        "set_recall", "set_coverage", "set_mean_spread_ratio")


def sweep(run_dir: str | Path, *, n: int = 256, sets: int = 4, per_set: int = 32, samplers=None, scales=SWEEP_SCALES,
          progress=print) -> dict:
    """Evaluate ``run_dir`` at every (sampler, scale); return the points and write sweep.json / sweep.png."""
    from .evaluate import EvalSize, eval_summary, evaluate_run

    run_dir = Path(run_dir)
    samplers = samplers or SWEEP_SAMPLERS
    log = ResultLog(run_dir / "sweep.jsonl")
    for name, node in samplers.items():
        for scale in scales:
            def compute(node=node, scale=scale, name=name) -> dict:
                ev = evaluate_run(run_dir, {"sampler": dict(node), "cfg_scale": scale},
                                  EvalSize(n=n, sets=sets, per_set=per_set), progress=False, write=False)
                summary = eval_summary(ev)
                rec = {**{k: summary[k] for k in KEPT if k in summary},
                       "references": {k: summary[f"{k}_real_reference"] for k in KEPT if f"{k}_real_reference" in summary}}
                progress(f"  {name} cfg {scale:g}: accuracy {rec['attr_accuracy']:.4f}, defects {rec['defect_rate']:.3f}, "
                         f"recall {rec['recall']:.3f}, coverage {rec['coverage']:.3f}, "
                         f"spread {rec.get('set_mean_spread_ratio', float('nan')):.3f}")
                return rec

            log.once({"sampler": name, "cfg_scale": scale, "n": n}, compute)
    points = [r for r in log.records if r["n"] == n and r["sampler"] in samplers and r["cfg_scale"] in scales]
    result = {"run": str(run_dir), "n": n, "sets": sets, "per_set": per_set, "points": points}
    write_json(run_dir / "sweep.json", result)
    _plot(run_dir / "sweep.png", points, samplers)
    return result


def _plot(out: Path, points: list[dict], samplers) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for name in samplers:
        pts = sorted((p for p in points if p["sampler"] == name), key=lambda p: p["cfg_scale"])
        if not pts:
            continue
        for ax, key in zip(axes, ("coverage", "set_mean_spread_ratio")):
            xs = [p.get(key, float("nan")) for p in pts]
            ax.plot(xs, [p["attr_accuracy"] for p in pts], marker="o", label=name)
            for p, x in zip(pts, xs):
                ax.annotate(f"{p['cfg_scale']:g}", (x, p["attr_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if points:
        ref = points[0]["references"]
        for ax, key in zip(axes, ("coverage", "set_mean_spread_ratio")):
            if key in ref:
                ax.axvline(ref[key], color="k", ls="--", lw=0.8, label="real vs real")
    axes[0].set_xlabel("coverage (k = 5)")
    axes[1].set_xlabel("per-set nuisance spread ratio (samples / real)")
    for ax in axes:
        ax.set_ylabel("attribute accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("quality vs diversity over samplers; labels: guidance scale")
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
