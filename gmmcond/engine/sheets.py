"""Sample sheets of a trained run: the grids ``launch/sample.py`` writes (samples, x0 strips, edits).

Each function takes a :class:`gmmcond.engine.runs.LoadedRun` and returns the grid's rows and captions;
the entry point only parses arguments and saves the PNG.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from ..data.attrs import describe, parse_attrs, parse_compose, parse_expr
from ..data.local import read_image
from ..errors import RunError
from ..sampling import HeadGuidedDenoiser, generate
from ..sampling.edit import apply_edit, edit_rows
from .precision import autocast, sampling_precision
from .runs import LoadedRun

def device_of_choice() -> str:
    """CUDA where present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_attributes(request, names: list[str]) -> list[str]:
    """The attributes a request leaves unspecified (drawn from the data by a partial model)."""
    return [n for n, k in zip(names, request.known.tolist()) if k < 0.5]


def sample_sheet(run: LoadedRun, sets: list[str], *, compose: str | None = None, n: int = 16, mode: str = "latents",
                 seed: int = 0, sampler=None, steps: int | None = None, cfg_scale: float | None = None,
                 cfg_null: str | None = None, head_scale: float = 0.0, precision: str | None = None, cols: int = 8,
                 log: Callable[[str], None] = print) -> tuple[list[torch.Tensor], list[str], torch.Tensor]:
    """Sample ``n`` images per attribute expression of ``sets`` (or one composed request) and lay them out.

    ``mode``: latents, a fresh GMM latent per sample (paper Fig. 4); fixed-latent, one latent per set and
    many noise seeds (Fig. 5); x0-strip, the predicted x0 at up to 12 steps, a row per sample (Fig. 6).
    Returns the grid rows, their captions and the samples.
    """
    parts, names, s = run.parts, run.parts.attr_names, run.cfg["sample"]
    sets = [compose] if compose else list(sets) or [""]
    terms = parse_compose(compose, names) if compose else None
    requests = [parse_expr("" if terms else text, names, parts.groups) for text in sets]
    partial = parts.conditioner.partial
    if partial:
        for text, request in zip(sets, requests):
            left = open_attributes(request, names) if not terms else []
            if left:
                log(f"'{text}': left open (drawn from the data): {', '.join(left)}")
    elif any("~" in text for text in sets):
        log("note: this run was trained with attr_dropout = 0, so every attribute not listed means absent "
            "(~name changes nothing, except that negating every member of a group but one names that one); train with "
            "conditioner.attr_dropout > 0 to leave attributes unspecified")
    attrs = torch.stack([r.values for r in requests]).repeat_interleave(n, 0)
    known = torch.stack([r.known for r in requests]).repeat_interleave(n, 0) if partial else None
    model = None
    if head_scale:
        if parts.head is None:
            raise RunError("--head-scale needs a run trained with a head (head: bottleneck_attrs); this run has none")
        model = HeadGuidedDenoiser(parts.denoiser, parts.head, head_scale, only_present=True)
    latents = None
    if mode == "fixed-latent":  # one latent per attribute set, shared by its n samples
        if not parts.conditioner.dim:
            raise RunError("--mode fixed-latent needs a run trained with a conditioner; this run is unconditional")
        latents = parts.conditioner.sample_latents(len(sets), torch.Generator().manual_seed(seed + 1)).repeat_interleave(n, 0)
    strips = []
    callback = (lambda info: strips.append(info["denoised"].cpu())) if mode == "x0-strip" else None
    device = device_of_choice()
    parts.denoiser.to(device)
    if parts.head is not None:
        parts.head.to(device)
    with autocast(device, precision or sampling_precision(run.cfg, device)):
        images = generate(parts, attrs, sampler=sampler or s["sampler"], steps=steps or s["steps"], seed=seed,
                          latents=latents, cfg_scale=s["cfg_scale"] if cfg_scale is None else cfg_scale,
                          callback=callback, model=model, head_target=attrs if head_scale else None,
                          known=known, compose=terms, cfg_null=cfg_null or s["cfg_null"]).float()
    rows, captions = [], []
    if mode == "x0-strip":  # row b: predicted x0 of sample b at (up to) 12 evenly spaced steps
        picks = torch.linspace(0, len(strips) - 1, min(12, len(strips))).round().long().tolist()
        for b in range(len(images)):
            rows.append(torch.stack([strips[i][b] for i in picks]).float())
            captions.append(f"{sets[b // n] or '(no attributes)'}: x0 at steps {[i + 1 for i in picks]}")
    else:
        for label, block in zip(sets, images.split(n)):
            for j, row in enumerate(block.split(cols)):
                rows.append(row)
                captions.append((label or "(no attributes)") if j == 0 else "")
    return rows, captions, images


def sheet_name(mode: str, sets: list[str]) -> str:
    """The default file name of a sample sheet: the mode and the requests, made file-safe."""
    slug = "_".join(re.sub(r"[^A-Za-z0-9_]+", "-", x) for x in sets if x) or "none"
    return f"{mode}_{slug[:80]}.png"


def edit_sheet(run: LoadedRun, image_file: str | Path, edits: list[str], *, source_attrs: str | None = None,
               read_source: Callable[[torch.Tensor], torch.Tensor] | None = None, method: str = "both", n: int = 4,
               strength: float | None = None, sampler=None, steps: int | None = None, seed: int = 0, iters: int = 3, cfg_scale: float | None = None, precision: str | None = None,
               log: Callable[[str], None] = print) -> tuple[list[torch.Tensor], list[str]]:
    """The image beside ``n`` edits per request and method (invert, sdedit or both); returns rows and captions.
    The source attributes are ``source_attrs`` or, where not given, ``read_source(image)`` (launch/sample.py
    passes :func:`gmmcond.eval.evaluator.attribute_reader`, the run's evaluator)."""
    parts, names = run.parts, run.parts.attr_names
    if not parts.conditioner.dim:
        raise RunError("--edit needs a run trained with a conditioner; this run is unconditional")
    if not edits:
        raise RunError('--edit needs at least one --attrs edit request, e.g. --attrs "square,blue"')
    image = read_image(Path(image_file), parts.dataset.size)
    if source_attrs:
        source = parse_attrs(source_attrs, names, parts.groups)
    elif read_source is not None:
        source = read_source(image)
    else:
        raise RunError("--edit needs the image's attributes: give --source-attrs")
    log(f"source attributes: {describe(source, names)}")
    targets = [apply_edit(source[None], parse_expr(r, names, parts.groups), names, parts.groups)[0] for r in edits]
    labels = [describe(t, names) for t in targets]
    for request, label in zip(edits, labels):
        log(f"edit '{request}' asks for: {label}")
    s = run.cfg["sample"]
    device = device_of_choice()
    parts.denoiser.to(device)
    methods = ("invert", "sdedit") if method == "both" else (method,)
    with autocast(device, precision or sampling_precision(run.cfg, device)):
        return edit_rows(parts, image, source, targets, labels, methods=methods, n=n, strength=strength,
                         sampler=sampler or s["sampler"], steps=steps or s["steps"], seed=seed, iters=iters,
                         cfg_scale=s["cfg_scale"] if cfg_scale is None else cfg_scale)
