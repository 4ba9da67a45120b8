"""Evaluate a run offline: ``python launch/evaluate.py --run runs/shapes`` (writes RUN/eval.json, RUN/eval_worst.png,
RUN/eval_diversity.png); ``--sweep`` evaluates samplers x guidance scales (RUN/sweep.json, RUN/sweep.png). ``python launch/evaluate.py --train-evaluator`` trains a new evaluator of the
default shapes data beside the committed one (gmmcond/eval/weights/shapes16_<sha256>.safetensors), never over it."""
import argparse
import json
import re


from gmmcond.cli import fail_cleanly, guidance_scale, positive_int
from gmmcond.errors import RunError
from gmmcond.modeling.runs import posthoc_sigma_rel


def run_weights(text: str) -> str:
    """argparse type: ema, live or posthoc:SIGMA_REL."""
    try:
        posthoc_sigma_rel(text)
    except RunError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def sampler_node(text: str):
    """argparse type: a sampler key or a YAML node (YAML 1.2 floats, so renoise: 5e-1 works)."""
    from gmmcond.config import yaml_load

    try:
        return yaml_load(text, "--sampler")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tag_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise argparse.ArgumentTypeError(f"--tag '{text}': use letters, digits, '_', '.' or '-' only")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="run directory written by launch/train.py")
    parser.add_argument("--n", type=positive_int, help="conditional samples (attribute rows of held-out data)")
    parser.add_argument("--sampler", type=sampler_node,
                        help='sampler name or node, e.g. dpmpp_2m or "{type: x0_reproject, renoise: 0.5}" (default: the run\'s)')
    parser.add_argument("--tag", type=tag_name, help="write eval_TAG.json (and PNGs) instead of eval.json, e.g. for another sampler")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--cfg-scale", type=guidance_scale, help="guidance scale >= 0 (see launch/sample.py --help)")
    parser.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only where LO < sigma <= HI (see launch/sample.py --help)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="sampling autocast (default: the run's training precision where this machine runs it)")
    parser.add_argument("--evaluator", help="evaluator file to use (default: the frozen one for the default shapes "
                                            "data, else one trained on first use and cached)")
    parser.add_argument("--sets", type=int, default=6, help="attribute sets for the per-set diversity metrics (shapes)")
    parser.add_argument("--per-set", type=positive_int, default=48, help="samples (and real redraws) per attribute set")
    parser.add_argument("--weights", type=run_weights, default="ema",
                        help="ema (default): the averaged weights sampling uses; live: the trained weights before "
                             "averaging, from the latest checkpoint; posthoc:SIGMA_REL: an EMA of that relative length "
                             "reconstructed from a run trained with train.posthoc_ema (with --tag, to choose the EMA)")
    parser.add_argument("--memorisation", type=int, default=256,
                        help="samples conditioned on training rows for the memorisation check (authenticity); 0 skips it")
    parser.add_argument("--sweep", action="store_true",
                        help="samplers x guidance scales on this run (RUN/sweep.json, RUN/sweep.png); --n defaults to 256")
    parser.add_argument("--train-evaluator", action="store_true",
                        help="train an evaluator of the default shapes data into a new file beside the frozen one")
    args = parser.parse_args()

    if args.train_evaluator:
        from gmmcond.config import load_config
        from gmmcond.eval.evaluator import FROZEN, save_evaluator, train_evaluator, weights_sha256
        from gmmcond.registry import DATASETS

        dataset = load_config("shapes")["dataset"]
        model, scores = train_evaluator(dataset)
        # a new file beside the frozen one, never over it: evaluations keep citing the weights they used
        out = FROZEN.with_name(f"{FROZEN.stem}_{weights_sha256(model.state_dict())[:12]}.safetensors")
        save_evaluator(out, model, dataset, list(DATASETS.build(dataset).attr_names), scores)
        print(json.dumps(scores, indent=2))
        print(f"wrote {out} (the frozen {FROZEN.name} is unchanged; use it with --evaluator {out}, or replace the "
              f"frozen file by hand and update the pinned sha256 in tests/test_evaluate.py)")
        return
    if not args.run:
        parser.error("--run is required (or --train-evaluator)")

    if args.sweep:
        from gmmcond.eval.sweep import sweep

        result = sweep(args.run, n=args.n or 256)
        nan = float("nan")
        print(f"{'sampler':<20}{'cfg':>5}{'conformity':>11}{'defects':>9}{'set recall':>11}{'set coverage':>13}"
              f"{'spread':>8}{'accuracy':>10}")
        for p in result["points"]:
            print(f"{p['sampler']:<20}{p['cfg_scale']:>5g}{p['all_attributes_correct']:>11.4f}{p['defect_rate']:>9.3f}"
                  f"{p.get('set_recall', nan):>11.3f}{p.get('set_coverage', nan):>13.3f}"
                  f"{p.get('set_mean_spread_ratio', nan):>8.3f}{p['attr_accuracy']:>10.4f}")
        print(f"wrote {args.run}/sweep.json and {args.run}/sweep.png")
        return

    from gmmcond.eval.evaluate import METRICS, EvalSize, eval_stem, evaluate_run

    sampling = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                "cfg_interval": args.cfg_interval, "seed": args.seed, "precision": args.precision}
    size = EvalSize(n=args.n or 512, sets=args.sets, per_set=args.per_set, memorisation=args.memorisation)
    result = evaluate_run(args.run, sampling, size, evaluator=args.evaluator, tag=args.tag, weights=args.weights)
    h = result["headline"]
    print(f"all attributes correct {h['all_attributes_correct']:.4f}, defects {h['defect_rate']:.2%} "
          f"(real held-out images: {result['real_heldout_defect_rate']:.2%})")
    for key, label in (("set_recall", "per-set recall"), ("set_coverage", "per-set coverage")):
        if key in h:
            print(f"{label:<22}{h[key]['value']:>10.4f}  real {h[key]['real_reference']:.4f}  "
                  f"({h[key]['fraction_of_reference']:.2f}x; target >= 0.85x)")
    if "set_spread_ratio" in h:
        v = h["set_spread_ratio"]
        print(f"{'per-set spread ratio':<22}{v['value']:>10.4f}  real {v['real_reference']:.4f}  "
              f"(target {v['target'][0]} to {v['target'][1]}: {'in' if v['in_band'] else 'OUT OF'} band)")
    if "auth_pct" in h:
        mem = result["memorisation"]
        print(f"{'authenticity (AuthPct)':<22}{h['auth_pct']['value']:>10.1f}  real {h['auth_pct']['real_reference']:.1f}  "
              f"(samples on {mem['n']} training rows; {mem['nearest_is_own_training_row']:.1%} nearest their own row)")
    print(f"secondary: mean attribute accuracy {result['attr_accuracy']:.4f}; whole-set metrics:")
    print(f"{'metric':<22}{'samples':>10}{'real reference':>16}")
    for name in METRICS:
        print(f"{name:<22}{result[name]['value']:>10.4f}{result[name]['real_reference']:>16.4f}")
    print("per attribute:", {k: round(v, 3) for k, v in result["per_attribute"].items()})
    print(f"wrote {args.run}/{eval_stem(args.tag)}.json")


if __name__ == "__main__":
    fail_cleanly(main)
