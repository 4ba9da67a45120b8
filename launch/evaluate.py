"""Evaluate a run offline: ``python launch/evaluate.py --run runs/shapes`` (writes RUN/eval.json, RUN/eval_worst.png)."""
import argparse
import json

from gmmcond.cli import fail_cleanly, positive_int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--n", type=positive_int, default=512, help="conditional samples (attribute sets from held-out data)")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="sampling autocast (default: the run's training precision where this machine runs it)")
    args = parser.parse_args()

    from gmmcond.eval.evaluate import evaluate_run

    result = evaluate_run(args.run, n=args.n, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                          precision=args.precision)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict) or k == "defect_reasons"}, indent=2))
    print("per attribute:", {k: round(v, 3) for k, v in result["per_attribute"].items()})


if __name__ == "__main__":
    fail_cleanly(main)
