"""Benchmarks against plain k-diffusion, measured in one run.

``python launch/benchmark.py samplers``: samplers on the exact Gaussian-mixture testbed, and the step time
of x0_reproject against k-diffusion's euler on the shapes model.
``python launch/benchmark.py train``: training step time of plain k-diffusion image_v1 (a) and gmmcond's
default in fp32 (b), bf16 (c), compiled fp32 (d), compiled bf16 (e), interleaved; FLOPs per step, the
machine's matmul/conv peaks and peak memory, all in one run; ratios to (a). JSON: runs/benchmark/train.json.
``python launch/benchmark.py quality``: train the recipe once and evaluate its EMA weights every ``--every``
steps with the frozen evaluator: conformity, defects, per-set recall / coverage / spread against training
minutes and steps (runs/benchmark/quality.json, quality.png; resumable).
``python launch/benchmark.py sampler-budget --runs RUN [RUN ...]``: the recipe's sampler against settings of 30 model
calls a sample or fewer and guidance in an interval, on the same trained runs (seeds), each evaluated at
launch/evaluate.py's defaults
(runs/benchmark/sampler_budget.json; resumable per run and setting).
``python launch/benchmark.py recipes --runs RUN [RUN ...]``: trained runs of several recipes (seeds of each) side by
side, each scored with the default recipe's sampling setting as sampler-budget scores it, paired by training seed
(runs/benchmark/recipes.json).
``python launch/benchmark.py peer --runs RUN [RUN ...]``: diffusers' UNet2DModel trained as diffusers' text-to-image
example trains, for each run's own training minutes (at its median step time; or --minutes; or, with --calibrate,
for the steps it makes in the time the run's steps take on this machine now) on its data (seed i
beside run i), both scored at the
evaluation's defaults (runs/benchmark/peer.json; resumable per run and peer recipe; needs the ``peer`` extra); ``FIELD=VALUE``
arguments change the peer's recipe (gmmcond.experiments.peer.PeerRecipe), e.g. ``lr=1e-3``.
``python launch/benchmark.py jobs``: training steps an hour on this CPU one process on every core, two runs at once
each on its own core(s) (``reproduce.py --jobs 2``), and one run on two processes (gloo), measured one after another
(runs/benchmark/jobs.json; ``--jobs N``, ``--steps N``).
``python launch/benchmark.py ema-lengths --runs RUN...``: runs trained with ``train.posthoc_ema`` scored with their
training EMA and with post-hoc EMAs of each ``--sigma-rels`` length (EDM2), paired by run (runs/benchmark/ema_lengths.json).
``python launch/benchmark.py profile``: torch.profiler over 20 steps of the real training loop, eager and
compiled: time per phase (data, forward, loss check, backward, optimiser, EMA), loop overhead, and operator
time by kind (runs/benchmark/profile.json).
"""
import argparse
from pathlib import Path

from gmmcond.cli import fail_cleanly
from gmmcond.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=list(COMMANDS))
    parser.add_argument("--out", default="runs/benchmark", help="output folder")
    parser.add_argument("--config", default="shapes", help="recipe whose model is timed")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (train)")
    parser.add_argument("--every", type=int, default=1000, help="steps between evaluated marks (quality)")
    parser.add_argument("--n", type=int, help="evaluation samples per mark (quality, probes: default 256) or per "
                                                      "evaluation (sampler-budget: default 512, launch/evaluate.py's)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="quality: evaluate the marks a stopped run has so far, without training on")
    parser.add_argument("--probes", nargs="*", help="probes: the PROBES names to run (default: all)")
    parser.add_argument("--runs", nargs="*", help="sampler-budget, peer: trained runs of one recipe (its seeds); "
                                                     "recipes: of several")
    parser.add_argument("--minutes", type=float, help="peer: its training minutes (default: each run's own, at its "
                                                       "median step time)")
    parser.add_argument("--calibrate", action="store_true",
                        help="peer: train the peer for the steps it makes in the time the run's steps take on this "
                             "machine now (both timed back to back first), not for the run's logged minutes: fair on "
                             "a host whose speed drifts or that other work shares")
    parser.add_argument("--jobs", type=int, default=2, help="jobs: processes at once")
    parser.add_argument("--steps", type=int, default=300, help="jobs: training steps each way")
    parser.add_argument("--settings", nargs="*", help="sampler-budget: the SAMPLER_BUDGET names to run (default: all)")
    parser.add_argument("--sigma-rels", nargs="*", type=float,
                        help="ema-lengths: the post-hoc EMA lengths (sigma_rel) to reconstruct and score (default: "
                             "0.05 0.08 0.1 0.15 0.2)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the recipe (quality, profile, train), e.g. "
                                                     "train.adamw_impl=fused; peer: of its PeerRecipe fields, e.g. lr=1e-3")
    args = parser.parse_intermixed_args()  # overrides may follow the options

    if args.what in NEEDS_RUNS and not args.runs:
        parser.error(f"{args.what} needs --runs RUN [RUN ...], {NEEDS_RUNS[args.what]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name, result, report = COMMANDS[args.what](args, out)
    write_json(out / name, result)
    print(report)
    print(f"wrote {out / name}")


# Each command: (args, out) -> (the JSON's file name, the result, what to print); the tail of main writes and prints.
NEEDS_RUNS = {"sampler-budget": "trained runs of one recipe", "peer": "trained runs of one recipe",
              "recipes": "trained runs of several recipes (seeds of each)",
              "ema-lengths": "runs of one recipe trained with train.posthoc_ema"}


def quality(args, out):
    from gmmcond.config import load_config
    from gmmcond.experiments import benchmarks

    cfg = load_config(args.config, args.overrides)
    result = benchmarks.quality_over_time(cfg, out / f"quality_{cfg['name']}", every=args.every, n=args.n or 256,
                                          train_first=not args.evaluate_only)
    benchmarks.plot_quality(result, out / "quality.png")
    return "quality.json", result, benchmarks.quality_table(result) + f"\nwrote {out / 'quality.png'}"


def sampler_budget(args, out):
    from gmmcond.experiments import benchmarks
    from gmmcond.experiments.document import sampler_budget_table

    result = benchmarks.sampler_budget(args.runs, args.settings, n=args.n or 512)
    return "sampler_budget.json", result, sampler_budget_table(result)


def recipes(args, out):
    from gmmcond.experiments import benchmarks
    from gmmcond.experiments.document import sampler_budget_table

    result = benchmarks.recipes_compared(args.runs, n=args.n or 512)
    return "recipes.json", result, sampler_budget_table(result)


def peer(args, out):
    from gmmcond.experiments.document import sampler_budget_table
    from gmmcond.experiments.peer import PeerRecipe, peer_vs_runs

    result = peer_vs_runs(args.runs, PeerRecipe.from_overrides(args.overrides), minutes=args.minutes,
                          calibrate=args.calibrate, n=args.n or 512, out=out)
    return "peer.json", result, sampler_budget_table(result)


def jobs(args, out):
    from gmmcond.experiments import benchmarks

    result = benchmarks.jobs_throughput(args.config, args.overrides, out / "jobs", Path(__file__).parent / "train.py",
                                        jobs=args.jobs, steps=args.steps)
    return "jobs.json", result, benchmarks.jobs_table(result)


def probes(args, out):
    from gmmcond.experiments import benchmarks

    results = benchmarks.recipe_probes(out / "probes", args.probes, n=args.n or 256)
    return "probes.json", results, benchmarks.probes_table(results)


def profile(args, out):
    from gmmcond.config import load_config
    from gmmcond.experiments import benchmarks

    results = [benchmarks.profile_training(load_config(args.config, [*args.overrides, f"train.compile={str(c).lower()}"]))
               for c in (False, True)]
    return "profile.json", results, benchmarks.profile_table(results)


def train(args, out):
    from gmmcond.config import load_config
    from gmmcond.experiments import benchmarks

    result = benchmarks.train_step_time(load_config(args.config, args.overrides), rounds=args.rounds)
    return "train.json", result, benchmarks.train_table(result)


def samplers(args, out):
    import torch

    from gmmcond.config import load_config
    from gmmcond.experiments import benchmarks
    from gmmcond.modeling.build import build

    result = benchmarks.testbed_samplers()
    result["renoise_sweep"] = benchmarks.renoise_sweep()
    torch.manual_seed(0)
    parts = build(load_config(args.config))  # step time does not depend on the weights: an untrained model
    parts.denoiser.eval()
    result["step_time"] = benchmarks.sampler_step_time(parts)
    benchmarks.plot_samplers(result, out / "samplers.png")
    lines = [benchmarks.markdown_table(result), "",
             "x0_reproject renoise sweep (sliced W1, mode weights, within-mode spread); truth: "
             f"{[[round(v, 3) for v in vs] for vs in result['renoise_sweep']['true']]}"]
    for r in result["renoise_sweep"]["runs"]:
        lines.append(f"  r={r['renoise']:.1f} steps={r['steps']:4d} sw1={r['sw1']:.4f} "
                     f"weights={[round(v, 3) for v in r['mode_weights']]} spread={[round(v, 3) for v in r['mode_spread']]}")
    st = result["step_time"]
    t = st["sec_per_step"]
    lines += ["", f"step time on the {args.config} model (batch {st['batch']}, median (IQR) of {st['repeats']} interleaved "
              f"rounds): x0_reproject {t['x0_reproject']['median'] * 1e3:.1f} ms ({t['x0_reproject']['iqr'] * 1e3:.1f}), "
              f"euler {t['euler']['median'] * 1e3:.1f} ms ({t['euler']['iqr'] * 1e3:.1f}), ratio "
              f"{st['ratio_x0_reproject_to_euler']:.3f}", f"wrote {out / 'samplers.png'}"]
    return "samplers.json", result, "\n".join(lines)


def ema_lengths(args, out):
    from gmmcond.experiments import benchmarks
    from gmmcond.experiments.document import sampler_budget_table

    result = benchmarks.ema_lengths(args.runs, args.sigma_rels or benchmarks.EMA_LENGTHS, n=args.n or 512)
    return "ema_lengths.json", result, sampler_budget_table(result)


COMMANDS = {"samplers": samplers, "train": train, "quality": quality, "profile": profile, "probes": probes,
            "sampler-budget": sampler_budget, "recipes": recipes, "peer": peer, "jobs": jobs, "ema-lengths": ema_lengths}

if __name__ == "__main__":
    fail_cleanly(main)
