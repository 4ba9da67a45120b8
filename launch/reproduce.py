"""Reproduce the paper's experiments at small scale: ``python launch/reproduce.py {density,ngmg-vs-bce,head,features-vs-classes,precision,combinations,distribution}``,
``python launch/reproduce.py editing --run RUN`` (edits of held-out shapes by a trained run);
``python launch/reproduce.py report`` prints the markdown tables of every finished experiment;
``python launch/reproduce.py document`` regenerates launch/figures/RESULTS.md and the README's results summary from the
committed JSON (``--check``: change nothing, fail if either differs).

Each sub-command writes OUT/NAME.json (and OUT/NAME.png where there is a plot; default OUT: runs/reproduce).
Long ones are resumable: finished (arm, seed) results are appended to OUT/NAME.jsonl as they land, and a
re-run skips them, so they can run in the background (``nohup ... &``) and survive an interrupted process.
"""
import argparse
import json
from pathlib import Path

from gmmcond.cli import fail_cleanly
from gmmcond.io import write_json


TRAINED = ("head", "distribution", "features-vs-classes", "precision", "combinations")  # experiments that train runs
REUSING = ("head", "distribution", "features-vs-classes", "precision")  # those whose arms train_and_evaluate alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", choices=["density", "ngmg-vs-bce", "head", "features-vs-classes", "precision", "combinations", "editing", "distribution", "report", "document"])
    parser.add_argument("--out", default="runs/reproduce", help="output folder")
    parser.add_argument("--seeds", type=int, help="seeds (default: ngmg-vs-bce 5, head 3, features-vs-classes 3, precision 2, combinations 2, "
                             "distribution 3, editing 3)")
    parser.add_argument("--steps", type=int,
                        help="training steps (default: each experiment's own; editing: sampling steps, default the run's)")
    parser.add_argument("--n", type=int, help="evaluated samples per run (default 512; head, features-vs-classes, precision)")
    parser.add_argument("--run", help="editing: the trained run whose edits are measured (the default recipe's)")
    parser.add_argument("--scale", default="v1",
                        help="head, distribution, features-vs-classes, combinations: the recipe scale (gmmcond.experiments."
                             "reproduce.SCALES): v1, the shapes recipe as the paper experiments first ran (no attention, "
                             "Karras weighting; the default, so older tables reproduce), or recipe, the default recipe as it is")
    parser.add_argument("--arms", nargs="*", help="head, distribution, combinations: run only these arms (names as in "
                                                  "the table; default all)")
    parser.add_argument("--no-train", action="store_true",
                        help=f"{', '.join(TRAINED)}: train and evaluate nothing, "
                             "tabulate the finished (arm, seed) results up to --seeds (each row says how many seeds it has)")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="JSONL",
                        help=f"{', '.join(REUSING)}: other experiments' result logs (OUT/NAME.jsonl, or a copy committed "
                             "under launch/figures/results); an arm whose training and evaluation one of them already "
                             "holds (same resolved config, same n) is taken from it instead of trained again")
    parser.add_argument("--sweep", default="runs/shapes/sweep.json", help="report: the sweep to tabulate")
    parser.add_argument("--check", action="store_true", help="document: write nothing; exit 1 if a file would change")
    parser.add_argument("--recipe-runs", nargs="*", default=[], help="report: evaluated runs of one recipe (seeds), one table row")
    args = parser.parse_args()

    out = Path(args.out)
    if args.experiment == "document":
        from gmmcond.experiments.document import build
        from gmmcond.io import write_atomically

        repo = Path(__file__).resolve().parent.parent
        files = build(repo)
        stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
        for path in [] if args.check else stale:
            write_atomically(path, lambda tmp, text=files[path]: tmp.write_text(text))
        print("\n".join(f"{'stale' if args.check else 'wrote'} {p.relative_to(repo)}" for p in stale) or "up to date")
        if args.check and stale:
            raise SystemExit(1)
        return
    if args.experiment == "report":
        from gmmcond.experiments.report import report

        print(report(out, Path(args.sweep), [Path(r) for r in args.recipe_runs]))
        return

    from gmmcond.experiments import reproduce as experiments

    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{args.experiment}.png"
    steps = {"steps": args.steps} if args.steps else {}
    if args.seeds:
        steps["seeds"] = args.seeds
    if args.n and args.experiment in ("head", "features-vs-classes", "precision", "editing", "distribution"):
        steps["n"] = args.n
    if args.experiment in ("head", "features-vs-classes", "combinations", "distribution"):
        steps["scale"] = args.scale
    if args.no_train:
        if args.experiment not in TRAINED:
            parser.error(f"--no-train applies to {', '.join(TRAINED)}, not {args.experiment}")
        steps["train"] = False
    if args.reuse:
        if args.experiment not in REUSING:
            parser.error(f"--reuse applies to {', '.join(REUSING)}, not {args.experiment}")
        from gmmcond.io import ResultLog

        missing = [p for p in args.reuse if not Path(p).is_file()]
        if missing:
            parser.error(f"--reuse: no such result log {missing[0]!r}; give an experiment's OUT/NAME.jsonl")
        steps["reuse"] = tuple(ResultLog(Path(p)) for p in args.reuse)
    if args.arms and args.experiment not in ("head", "combinations", "distribution"):
        parser.error(f"--arms applies to head, distribution and combinations, not {args.experiment}")
    if args.experiment == "density":
        result = experiments.density(png, **{k: v for k, v in steps.items() if k == "steps"})
    elif args.experiment == "ngmg-vs-bce":
        result = experiments.ngmg_vs_bce(png, out / "ngmg-vs-bce.jsonl", **steps)
    elif args.experiment == "head":
        result = experiments.head(png, out / "runs", out / "head.jsonl", arms=args.arms, **steps)
    elif args.experiment == "combinations":
        result = experiments.combinations(png, out / "runs", out / "combinations.jsonl", arms=args.arms, **steps)
    elif args.experiment == "editing":
        if not args.run:
            parser.error("editing needs --run RUN, a run trained on the shapes data (e.g. by launch/train.py --config shapes)")
        from gmmcond.experiments.editing import editing

        result = editing(Path(args.run), png, out / "editing.jsonl", **steps)
    elif args.experiment == "distribution":
        result = experiments.distribution(png, out / "runs", out / "distribution.jsonl", arms=args.arms, **steps)
    elif args.experiment == "precision":
        result = experiments.precision(png, out / "runs", out / "precision.jsonl", **steps)
    else:
        result = experiments.features_vs_classes(png, out / "runs", out / "features-vs-classes.jsonl", **steps)
    write_json(out / f"{args.experiment}.json", result)
    if args.experiment == "editing":
        from gmmcond.experiments.report import editing_table

        print(editing_table(result))
        print(f"wrote {png} and {out / 'editing.json'}")
        return
    summary = {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, list)} if isinstance(v, dict) else v
               for k, v in result.items() if not isinstance(v, list)}
    print(json.dumps(summary, indent=2))
    print(f"wrote {png} and {out / (args.experiment + '.json')}")


if __name__ == "__main__":
    fail_cleanly(main)
