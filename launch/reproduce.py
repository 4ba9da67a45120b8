"""Reproduce the paper's experiments at small scale: ``python launch/reproduce.py NAME [options]`` for every experiment
in the registry (``gmmcond.experiments.runner.EXPERIMENTS``: density, ngmg-vs-bce, head, features-vs-classes,
distribution, precision, combinations, editing); ``report`` prints the markdown tables of every finished experiment
under --out; ``document`` regenerates launch/figures/RESULTS.md and the README's results summary from the committed
JSON (``--check``: change nothing, fail if either differs).

Each experiment writes OUT/NAME.json (and OUT/NAME.png where there is a plot; default OUT: runs/reproduce). Long
ones are resumable: finished results are appended to OUT/NAME.jsonl as they land, keyed by their full config, and a
rerun skips them, so they can run in the background (``nohup ... &``) and survive an interrupted process.
``--jobs N`` trains N arms at once, each process on its own share of the cores (OUT/NAME.worker{i}.log), then
tabulates: on a small CPU more arms an hour than one process on every core (``launch/benchmark.py jobs``).
"""
import argparse
import json
import sys
from pathlib import Path

from gmmcond.cli import fail_cleanly
from gmmcond.io import write_json


def main() -> None:
    from gmmcond.experiments import editing, reproduce  # noqa: F401  (fill the registry)
    from gmmcond.experiments.runner import EXPERIMENTS

    takers = lambda option: ", ".join(e.name for e in EXPERIMENTS.values() if option in e.takes)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "report", "document"])
    parser.add_argument("--out", default="runs/reproduce", help="output folder")
    parser.add_argument("--seeds", type=int, help=f"seeds ({takers('seeds')}; default each experiment's own)")
    parser.add_argument("--steps", type=int, help=f"training steps ({takers('steps')}; editing: sampling steps)")
    parser.add_argument("--n", type=int, help=f"evaluated samples per run, per combination for combinations ({takers('n')})")
    parser.add_argument("--run", help="editing: the trained run whose edits are measured (the default recipe's)")
    parser.add_argument("--cfg-scale", type=float, help="editing: the guidance scale to edit with (default the run's "
                                                          "own sample.cfg_scale)")
    parser.add_argument("--scale", help=f"{takers('scale')}: the recipe scale (gmmcond.experiments.reproduce.SCALES): v1, "
                                        "the shapes recipe as the paper experiments first ran (the default, so older "
                                        "tables reproduce), recipe, the default recipe as it is, or paper, the default "
                                        "recipe trained and sampled the paper's way (registry/shapes_paper.yaml)")
    parser.add_argument("--arms", nargs="*", help=f"{takers('arms')}: run only these arms (names as in the table)")
    parser.add_argument("--no-train", action="store_true",
                        help=f"{takers('train')}: train and evaluate nothing, tabulate the finished results up to "
                             "--seeds (each row says how many seeds it has)")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="JSONL",
                        help=f"{takers('reuse')}: other experiments' result logs (OUT/NAME.jsonl, or a copy committed "
                             "under launch/figures/results); an arm whose training and evaluation one of them already "
                             "holds (same resolved config, same n) is taken from it instead of trained again")
    parser.add_argument("--jobs", type=int, default=1,
                        help=f"{takers('train')}: train this many arms at once, each process pinned to its own share of "
                             "the cores (their output in OUT/NAME.worker{i}.log), then tabulate")
    parser.add_argument("--sweep", default="runs/shapes/sweep.json", help="report: the sweep to tabulate")
    parser.add_argument("--recipe-runs", nargs="*", default=[], help="report: evaluated runs of one recipe (seeds), one table row")
    parser.add_argument("--check", action="store_true", help="document: write nothing; exit 1 if a file would change")
    args = parser.parse_args()

    out = Path(args.out)
    if args.experiment == "document":
        document(args.check)
        return
    if args.experiment == "report":
        from gmmcond.experiments.report import report

        print(report(out, Path(args.sweep), [Path(r) for r in args.recipe_runs]))
        return

    from gmmcond.errors import ConfigError
    from gmmcond.io import ResultLog

    missing = [p for p in args.reuse if not Path(p).is_file()]
    if missing:
        parser.error(f"--reuse: no such result log {missing[0]!r}; give an experiment's OUT/NAME.jsonl")
    exp = EXPERIMENTS[args.experiment]
    try:
        opts = exp.options({"out": out, "seeds": args.seeds, "steps": args.steps, "n": args.n, "scale": args.scale,
                            "arms": tuple(args.arms or ()), "train": False if args.no_train else None,
                            "reuse": tuple(ResultLog(Path(p)) for p in args.reuse),
                            "run": Path(args.run) if args.run else None, "cfg_scale": args.cfg_scale})
    except ConfigError as e:
        parser.error(str(e))
    if args.jobs != 1 and "train" not in exp.takes:
        parser.error(f"--jobs applies to {takers('train')}, not {exp.name}")
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs != 1 and opts.train:
        opts = run_in_workers(exp.name, args.jobs, out, opts, parser)
    result = exp(opts)
    write_json(out / f"{exp.name}.json", result)
    from gmmcond.experiments.report import EXPERIMENT_TABLES

    if exp.name in EXPERIMENT_TABLES:
        print(EXPERIMENT_TABLES[exp.name](result))
    else:  # the numbers without their curves (those are in the JSON)
        drop_lists = lambda tree: {k: drop_lists(v) if isinstance(v, dict) else v  # noqa: E731
                                   for k, v in tree.items() if not isinstance(v, list)}
        print(json.dumps(drop_lists(result), indent=2))
    print(f"wrote {out / (exp.name + '.png')} and {out / (exp.name + '.json')}")


def run_in_workers(name: str, jobs: int, out: Path, opts, parser):
    """This command again as ``jobs`` workers (each with ``--jobs 1`` last, which argparse takes over the first);
    the options to tabulate their results with."""
    from dataclasses import replace

    from gmmcond.errors import ConfigError
    from gmmcond.experiments.runner import run_workers

    logs = [out / f"{name}.worker{i}.log" for i in range(jobs)]
    try:
        codes = run_workers([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--jobs", "1"], jobs, logs)
    except ConfigError as e:
        parser.error(str(e))
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    for i, code in failed:
        tail = logs[i].read_text(errors="replace").replace("\r", "\n").splitlines()[-5:]
        print(f"worker {i} exited with status {code}; the end of {logs[i]}:\n  " + "\n  ".join(tail), file=sys.stderr)
    if failed:
        raise SystemExit(f"{len(failed)} of {jobs} workers failed; what finished is logged in {out / (name + '.jsonl')}: "
                         "run the same command again to resume")
    return replace(opts, train=False)


def document(check: bool) -> None:
    """Regenerate the results document and the README's summary of it (or, with ``check``, fail if stale)."""
    from gmmcond.experiments.document import build
    from gmmcond.io import write_atomically

    repo = Path(__file__).resolve().parent.parent
    files = build(repo)
    stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
    for path in [] if check else stale:
        write_atomically(path, lambda tmp, text=files[path]: tmp.write_text(text))
    print("\n".join(f"{'stale' if check else 'wrote'} {p.relative_to(repo)}" for p in stale) or "up to date")
    if check and stale:
        raise SystemExit(1)


if __name__ == "__main__":
    fail_cleanly(main)
