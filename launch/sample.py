"""Sample a trained run: ``python launch/sample.py --run runs/shapes --attrs "circle,red,large" --n 16``;
edit an image's attributes: ``python launch/sample.py --run runs/shapes --edit shape.png --attrs "square,blue"``."""
import argparse
import re
from pathlib import Path

from gmmcond.cli import fail_cleanly, guidance_scale, positive_int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="run directory written by launch/train.py")
    parser.add_argument("--attrs", action="append", default=[],
                        help='attribute expression, e.g. "triangle,~red,large": listed present, ~ absent, the rest '
                             'unspecified (on runs trained with attr_dropout > 0; else absent); repeat for more rows')
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
                         help="fixed-point iterations per inversion step (0: plain DDIM inversion; README, Editing)")
    parser.add_argument("--list-attrs", action="store_true", help="print the run's attribute names and exit")
    args = parser.parse_args()

    import torch

    from gmmcond.data.attrs import parse_compose, parse_expr
    from gmmcond.engine.precision import autocast, sampling_precision
    from gmmcond.engine.runs import export_run, load_run
    from gmmcond.errors import RunError
    from gmmcond.sampling import HeadGuidedDenoiser, generate
    from gmmcond.visualize import captioned_grid, save_png

    run = load_run(args.run)
    names = run.parts.attr_names
    if args.list_attrs:
        print("\n".join(names))
        return
    if args.export:
        export_run(Path(args.export), run.parts, run.cfg, run.step)
        print(f"wrote {args.export}")
    if args.edit:
        return edit_image(args, run)
    args.n = args.n or 16
    sets = [args.compose] if args.compose else args.attrs or [""]
    compose = parse_compose(args.compose, names) if args.compose else None
    requests = [parse_expr("" if compose else s, names, run.parts.groups) for s in sets]
    attrs = torch.stack([r.values for r in requests]).repeat_interleave(args.n, 0)
    partial = getattr(run.parts.conditioner, "partial", False)
    known = torch.stack([r.known for r in requests]).repeat_interleave(args.n, 0) if partial else None
    if not partial and any("~" in s for s in sets):
        print("note: this run was trained with attr_dropout = 0, so every attribute not listed means absent "
              "(~name changes nothing); train with conditioner.attr_dropout > 0 to leave attributes unspecified")
    s = run.cfg["sample"]
    sampler = args.sampler or s["sampler"]
    steps = args.steps or s["steps"]
    model = None
    if args.head_scale:
        if run.parts.head is None:
            raise RunError(f"--head-scale needs a run trained with a head (head: bottleneck_attrs); {args.run} has none")
        model = HeadGuidedDenoiser(run.parts.denoiser, run.parts.head, args.head_scale, only_present=True)
    latents = None
    if args.mode == "fixed-latent" and not run.parts.conditioner.dim:
        raise RunError(f"--mode fixed-latent needs a run trained with a conditioner; {args.run} is unconditional")
    if args.mode == "fixed-latent":  # one latent per attribute set, shared by its n samples
        gen = torch.Generator().manual_seed(args.seed + 1)
        latents = run.parts.conditioner.sample_latents(len(sets), gen).repeat_interleave(args.n, 0)
    strips = []
    callback = (lambda info: strips.append(info["denoised"].cpu())) if args.mode == "x0-strip" else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or sampling_precision(run.cfg, device)
    run.parts.denoiser.to(device)
    if run.parts.head is not None:
        run.parts.head.to(device)
    with autocast(device, precision):
        images = generate(run.parts, attrs, sampler=sampler, steps=steps, seed=args.seed, latents=latents,
                          cfg_scale=s["cfg_scale"] if args.cfg_scale is None else args.cfg_scale,
                          callback=callback, model=model, head_target=attrs if args.head_scale else None,
                          known=known, compose=compose).float()
    rows, captions = [], []
    if args.mode == "x0-strip":  # row b: predicted x0 of sample b at (up to) 12 evenly spaced steps
        picks = torch.linspace(0, len(strips) - 1, min(12, len(strips))).round().long().tolist()
        for b in range(len(images)):
            rows.append(torch.stack([strips[i][b] for i in picks]).float())
            captions.append(f"{sets[b // args.n] or '(no attributes)'}: x0 at steps {[i + 1 for i in picks]}")
    else:
        for label, block in zip(sets, images.split(args.n)):
            for j, row in enumerate(block.split(args.cols)):
                rows.append(row)
                captions.append((label or "(no attributes)") if j == 0 else "")
    slug = "_".join(re.sub(r"[^A-Za-z0-9_]+", "-", x) for x in sets if x) or "none"
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"{args.mode}_{slug[:80]}.png"
    save_png(captioned_grid(rows, captions), out)
    print(f"wrote {out} ({len(images)} samples, step {run.step}, sampler {sampler if isinstance(sampler, str) else sampler['type']})")


def edit_image(args, run) -> None:
    """--edit: a grid of the image beside its edits, one row per request and method."""
    import torch

    from gmmcond.data.attrs import describe, parse_attrs, parse_expr
    from gmmcond.data.local import read_image
    from gmmcond.engine.precision import autocast, sampling_precision
    from gmmcond.errors import RunError
    from gmmcond.sampling.edit import apply_edit, edit_rows, read_attributes
    from gmmcond.visualize import captioned_grid, save_png

    parts, names = run.parts, run.parts.attr_names
    if not parts.conditioner.dim:
        raise RunError(f"--edit needs a run trained with a conditioner; {args.run} is unconditional")
    if not args.attrs:
        raise RunError('--edit needs at least one --attrs edit request, e.g. --attrs "square,blue"')
    image = read_image(Path(args.edit), parts.dataset.size)
    if args.source_attrs:
        source = parse_attrs(args.source_attrs, names, parts.groups)
    else:
        from gmmcond.eval.evaluator import evaluator_for

        evaluator, meta, _ = evaluator_for(run.cfg["dataset"])
        if meta["attr_names"] != names:
            raise RunError(f"the evaluator of this run's data reads {meta['attr_names']}, not the run's attributes; "
                           f"give the image's attributes with --source-attrs")
        source = read_attributes(evaluator.predict(image[None])["probs"], names, parts.groups)[0]
    print(f"source attributes: {describe(source, names)}")
    targets = [apply_edit(source[None], parse_expr(r, names, parts.groups), names, parts.groups)[0] for r in args.attrs]
    labels = [describe(t, names) for t in targets]
    for request, label in zip(args.attrs, labels):
        print(f"edit '{request}' asks for: {label}")
    s = run.cfg["sample"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parts.denoiser.to(device)
    methods = ("invert", "sdedit") if args.edit_method == "both" else (args.edit_method,)
    with autocast(device, args.precision or sampling_precision(run.cfg, device)):
        rows, captions = edit_rows(parts, image, source, targets, labels, methods=methods, n=args.n or 4,
                                   strength=args.strength, sampler=args.sampler or s["sampler"],
                                   steps=args.steps or s["steps"], seed=args.seed, iters=args.inversion_iters,
                                   cfg_scale=s["cfg_scale"] if args.cfg_scale is None else args.cfg_scale)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / f"edit_{Path(args.edit).stem}.png"
    save_png(captioned_grid(rows, captions), out)
    print(f"wrote {out} ({len(rows)} rows, step {run.step})")


if __name__ == "__main__":
    fail_cleanly(main)
