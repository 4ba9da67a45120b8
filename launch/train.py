"""Train a gmmcond recipe: ``accelerate launch launch/train.py --config shapes [dotted.key=value ...]``."""
import argparse
import sys
from pathlib import Path

from gmmcond.cli import RESUME_CHOICES, bare_resume, fail_cleanly, resume_command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="shapes", help="recipe name in registry/ or a YAML path")
    parser.add_argument("--name", help="run name (default: the config's name); the run goes to RUNS/NAME")
    parser.add_argument("--runs", default="runs", help="parent folder of run directories")
    parser.add_argument("--resume", nargs="?", const="latest", choices=RESUME_CHOICES,
                        help="continue the run from its latest checkpoint; 'previous' takes the one before "
                             "(after a NaN stop or a corrupt latest checkpoint); 'auto' continues a run that has a "
                             "checkpoint and starts one that has none (batch scripts that requeue)")
    parser.add_argument("--resume-from", metavar="PATH", help="continue the run from this checkpoint file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 conditioner.sigma=0.3 "
                                                     "(anywhere on the command line)")
    args = parser.parse_intermixed_args(bare_resume(sys.argv[1:]))

    from gmmcond.config import load_config
    from gmmcond.engine.trainer import train
    from gmmcond.errors import Interrupted

    cfg = load_config(args.config, args.overrides)
    if args.name:
        cfg["name"] = args.name
    run_dir = Path(args.runs) / cfg["name"]
    resume = args.resume_from or args.resume or False
    if resume == "auto":
        from gmmcond.io import latest_checkpoint

        resume = "latest" if latest_checkpoint(run_dir) is not None else False
    try:
        train(cfg, run_dir, resume=resume)
    except Interrupted as exc:
        raise Interrupted(f"{exc}: {resume_command()}", exc.exit_code) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # left to interpreter exit, gloo's threads at times abort a rank (SIGABRT)
            dist.destroy_process_group()


if __name__ == "__main__":
    fail_cleanly(main)
