"""Sample a trained run: ``python launch/sample.py --run runs/shapes --attrs "circle,red,large" --n 16``."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gmmcond.cli import fail_cleanly  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run directory written by launch/train.py")
    parser.add_argument("--attrs", action="append", default=[],
                        help='comma-separated attribute names, e.g. "circle,red,large"; repeat for more rows')
    parser.add_argument("--n", type=int, default=16, help="samples per attribute set")
    parser.add_argument("--sampler", help="SAMPLERS key (default: the run's sample.sampler)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.steps)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cols", type=int, default=8, help="images per grid row")
    parser.add_argument("--out", help="output PNG (default: RUN/samples/sample_<attrs>.png)")
    parser.add_argument("--export", help="also write the EMA weights to this safetensors file")
    parser.add_argument("--list-attrs", action="store_true", help="print the run's attribute names and exit")
    args = parser.parse_args()

    import torch

    from gmmcond.pipeline import dataset_info, export_safetensors, generate, load_run, parse_attrs
    from gmmcond.visualize import captioned_grid, save_png

    run = load_run(args.run)
    names = run.parts.attr_names
    if args.list_attrs:
        print("\n".join(names))
        return
    if args.export:
        export_safetensors(Path(args.export), run.parts.denoiser.inner_model, run.cfg, dataset_info(run.parts.dataset), run.step)
        print(f"wrote {args.export}")
    sets = args.attrs or [""]
    attrs = torch.stack([parse_attrs(s, names) for s in sets]).repeat_interleave(args.n, 0)
    s = run.cfg["sample"]
    sampler = args.sampler or s["sampler"]
    images = generate(run.parts, attrs, sampler=sampler, steps=args.steps or s["steps"],
                      cfg_scale=s["cfg_scale"] if args.cfg_scale is None else args.cfg_scale, seed=args.seed)
    rows, captions = [], []
    for label, block in zip(sets, images.split(args.n)):
        for j, row in enumerate(block.split(args.cols)):
            rows.append(row)
            captions.append((label or "(no attributes)") if j == 0 else "")
    slug = "_".join(x.replace(",", "-") for x in sets if x) or "none"
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"sample_{slug[:80]}.png"
    save_png(captioned_grid(rows, captions), out)
    print(f"wrote {out} ({len(images)} samples, step {run.step}, sampler {sampler if isinstance(sampler, str) else sampler['type']})")


if __name__ == "__main__":
    fail_cleanly(main)
