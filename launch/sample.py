"""Sample a trained run: ``python launch/sample.py --run runs/shapes --attrs "circle,red,large" --n 16``;
edit an image's attributes: ``python launch/sample.py --run runs/shapes --edit shape.png --attrs "square,blue"``."""
import argparse
from pathlib import Path

from gmmcond.cli import fail_cleanly, guidance_scale, positive_int
from gmmcond.config import GUIDANCE_NULLS
from gmmcond.sampling.requests import DEFAULT_OPEN, OPEN_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run directory written by launch/train.py")
    parser.add_argument("--attrs", action="append", default=[],
                        help='attribute request, e.g. "triangle,~red,large": listed present, ~ absent, the rest open '
                             '(see --open); repeat for more rows')
    parser.add_argument("--open", choices=OPEN_MODES, default=DEFAULT_OPEN,
                        help="what an attribute the request leaves open means: data (default), drawn per sample from the "
                             "run's training rows that agree with the request, correlations kept; absent, as runs "
                             "sampled before; model, hidden by a run trained with conditioner.attr_dropout > 0")
    parser.add_argument("--save", metavar="DIR",
                        help="also write every sample as its own PNG and DIR/samples.csv: the request and the whole "
                             "attribute row each sample was conditioned on (what was asked, what was drawn)")
    parser.add_argument("--compose", help='composed guidance with per-attribute weights, e.g. "triangle:2,red:-1" '
                                          '(negative pushes away; needs a run trained with attr_dropout > 0)')
    parser.add_argument("--n", type=positive_int,
                        help="samples per attribute set (default 16; with --edit, edits per request, default 4)")
    parser.add_argument("--sampler", help="SAMPLERS key (default: the run's sample.sampler)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's sample.steps)")
    parser.add_argument("--cfg-scale", type=guidance_scale,
                        help="classifier-free guidance scale D_uncond + s (D_cond - D_uncond): 0 ignores the attributes, "
                             "between 0 and 1 mixes toward the unconditional model, 1 is plain conditional (no "
                             "guidance), above 1 guides; default: the run's sample.cfg_scale")
    parser.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only where LO < sigma <= HI (guidance in a limited interval), plain conditional "
                             "elsewhere; default: the run's sample.cfg_interval")
    parser.add_argument("--cfg-null", choices=GUIDANCE_NULLS,
                        help="what guidance pushes away from: dropped, the dropped condition it was trained with, or "
                             "all_unknown, every attribute unspecified (runs trained with attr_dropout > 0); default: "
                             "the run's sample.cfg_null")
    parser.add_argument("--head-scale", type=float, default=0.0,
                        help="guide with the run's bottleneck head toward the attributes (HeadGuidedDenoiser)")
    parser.add_argument("--mode", choices=["latents", "fixed-latent", "x0-strip"], default="latents",
                        help="latents: a fresh GMM latent per sample (paper Fig. 4); fixed-latent: one latent, "
                             "many noise seeds (Fig. 5); x0-strip: predicted x0 at every step, a row per sample (Fig. 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cols", type=positive_int, default=8, help="images per grid row")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="autocast precision for sampling (default: the run's train.precision)")
    parser.add_argument("--out", help="output PNG (default: RUN/samples/sample_<attrs>.png)")
    parser.add_argument("--export", help="also write the EMA weights to this safetensors file")
    editing = parser.add_argument_group("editing (--edit): each --attrs is an edit request; unlisted attributes keep the image's")
    editing.add_argument("--edit", metavar="IMAGE", help="image file to edit (cropped and resized to the run's size)")
    editing.add_argument("--source-attrs",
                         help="the image's own attributes, e.g. \"circle,red,large\" (default: read by the evaluator)")
    editing.add_argument("--edit-method", choices=["both", "invert", "sdedit"], default="both",
                         help="invert: DDIM inversion under the source attributes, then regeneration; sdedit: noise, "
                              "then denoise; both: a row of each")
    editing.add_argument("--strength", type=float,
                         help="how far into the noise an edit goes, in (0, 1] (default: invert 1, sdedit 0.6)")
    editing.add_argument("--inversion-iters", type=int, default=3,
                         help="fixed-point iterations per inversion step (0: plain DDIM inversion)")
    parser.add_argument("--list-attrs", action="store_true", help="print the run's attribute names and exit")
    args = parser.parse_args()

    from gmmcond.modeling.runs import export_run, load_run
    from gmmcond.sampling.sheets import edit_sheet, sample_sheet, save_samples, sheet_name
    from gmmcond.eval.evaluator import attribute_reader
    from gmmcond.visualize import captioned_grid, save_png

    run = load_run(args.run)
    if args.list_attrs:
        print("\n".join(run.parts.attr_names))
        return
    if args.export:
        export_run(Path(args.export), run.parts, run.cfg, run.step)
        print(f"wrote {args.export}")
    sampling = {"sampler": args.sampler, "steps": args.steps, "seed": args.seed, "cfg_scale": args.cfg_scale,
                "cfg_interval": args.cfg_interval, "precision": args.precision}
    if args.edit:
        if args.save:
            parser.error("--save applies to sampling, not to --edit")
        if args.cfg_null:
            parser.error("--cfg-null applies to sampling; edits guide with the dropped condition")
        source = args.source_attrs or attribute_reader(run.cfg["dataset"], run.parts.attr_names, run.parts.groups)
        rows, captions = edit_sheet(run, args.edit, args.attrs, sampling, source=source, method=args.edit_method,
                                    n=args.n or 4, strength=args.strength, iters=args.inversion_iters)
        default = f"edit_{Path(args.edit).stem}.png"
    else:
        sampling.update(head_scale=args.head_scale, cfg_null=args.cfg_null, open=args.open)
        rows, captions, samples = sample_sheet(run, args.attrs, sampling, compose=args.compose, n=args.n or 16,
                                               mode=args.mode, cols=args.cols)
        if args.save:
            print(f"wrote {len(samples.images)} PNGs and {save_samples(args.save, samples, run.parts.attr_names, args.n or 16)}")
        default = sheet_name(args.mode, [args.compose] if args.compose else args.attrs)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / default
    save_png(captioned_grid(rows, captions), out)
    print(f"wrote {out} ({len(rows)} rows, step {run.step})")


if __name__ == "__main__":
    fail_cleanly(main)
