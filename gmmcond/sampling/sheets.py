"""Sample sheets of a trained run: the grids ``launch/sample.py`` writes (samples, x0 strips, edits).

Each function takes a :class:`gmmcond.modeling.runs.LoadedRun` and returns the grid's rows and captions;
the entry point only parses arguments and saves the PNG.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..data.attrs import AttrRequest, describe, parse_attrs, parse_compose, parse_expr
from ..data.local import read_image
from ..errors import RunError
from ..io import atomic_write_bytes
from ..modeling.runs import LoadedRun
from ..visualize import to_pil
from .edit import apply_edit, edit_rows
from .generate import generate
from .guidance import HeadGuidedDenoiser
from .requests import Resolved, resolve_requests
from .settings import SamplingSettings


def device_of_choice() -> str:
    """CUDA where present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_attributes(request, names: list[str]) -> list[str]:
    """The attributes a request leaves unspecified."""
    return [n for n, k in zip(names, request.known.tolist()) if k < 0.5]


@dataclass
class Samples:
    """Images sampled for attribute requests, and the whole attribute row each was conditioned on."""

    images: torch.Tensor  # [B, 3, H, W] in [-1, 1], request-major (n per request)
    rows: torch.Tensor  # [B, K] 0/1: what each image was conditioned on (asked, and drawn where open)
    requests: list[AttrRequest]
    resolved: Resolved
    strips: list[torch.Tensor] = field(default_factory=list)  # predicted x0 per step (mode x0-strip)


def sample_requests(run: LoadedRun, sets: list[str], settings: SamplingSettings | Mapping | None = None, *, n: int = 16,
                    compose: str | None = None, mode: str = "latents", log: Callable[[str], None] = print) -> Samples:
    """Sample ``n`` images for each attribute request of ``sets`` (``"triangle,~red,large"``; listed present, ``~``
    absent, the rest open) from a loaded run; returns the images and the rows they were conditioned on.

    ``settings`` (:class:`SamplingSettings`, or a mapping of overrides on the run's ``sample`` section, e.g.
    ``{"open": "absent", "seed": 3}``) carries the sampler, guidance, seed and ``open``, what an open attribute
    means (:mod:`gmmcond.sampling.requests`): ``data`` (default, drawn from the run's training rows given what was
    named, seeded by the seed), ``absent`` or ``model`` (runs trained with ``attr_dropout > 0``). ``compose``
    (``"triangle:2,red:-1"``) samples composed guidance instead, each term with its own semantics (one attribute
    specified, the rest hidden). ``mode``: latents, a fresh GMM latent per sample (paper Fig. 4); fixed-latent, one
    latent per request and many noise seeds (Fig. 5); x0-strip, also keep the predicted x0 of every step (Fig. 6).

    Changed in 0.2: the sampling keywords (``open``, ``seed``, ``sampler``, ``steps``, ``cfg_scale``, ``cfg_null``,
    ``head_scale``, ``precision``) moved into ``settings``."""
    settings = SamplingSettings.of_run(run.cfg, settings)
    parts, names = run.parts, run.parts.attr_names
    sets = [compose] if compose else list(sets) or [""]
    terms = parse_compose(compose, names) if compose else None
    requests = [parse_expr("" if terms else text, names, parts.groups) for text in sets]
    if terms:  # composed guidance: every term has its own condition; the rows are unused
        resolved = resolve_requests(requests, n, open="absent")
    else:
        resolved = resolve_requests(requests, n, open=settings.open, prior=run.prior if settings.open == "data" else None,
                                    partial=parts.conditioner.partial, seed=settings.seed)
        describe_resolved(requests, resolved, names, n, log)
    model = None
    if settings.head_scale:
        if parts.head is None:
            raise RunError("--head-scale needs a run trained with a head (head: bottleneck_attrs); this run has none")
        model = HeadGuidedDenoiser(parts.denoiser, parts.head, settings.head_scale, only_present=True)
    latents = None
    if mode == "fixed-latent":  # one latent per attribute set, shared by its n samples
        if not parts.conditioner.dim:
            raise RunError("--mode fixed-latent needs a run trained with a conditioner; this run is unconditional")
        gen = torch.Generator().manual_seed(settings.seed + 1)
        latents = parts.conditioner.sample_latents(len(sets), gen).repeat_interleave(n, 0)
    strips = []
    callback = (lambda info: strips.append(info["denoised"].cpu())) if mode == "x0-strip" else None
    device = device_of_choice()
    parts.denoiser.to(device)
    if parts.head is not None:
        parts.head.to(device)
    with settings.autocast(run.cfg, device):
        images = generate(parts, resolved.attrs, settings, latents=latents, callback=callback, model=model,
                          head_target=resolved.attrs if settings.head_scale else None, known=resolved.known,
                          compose=terms).float()
    return Samples(images, resolved.attrs, requests, resolved, strips)


def describe_resolved(requests: list[AttrRequest], resolved: Resolved, names: list[str], n: int,
                      log: Callable[[str], None]) -> None:
    """One line per request saying what its open attributes were: drawn (with the frequency drawn beside the
    data's), absent, or hidden by the model; and a line for each request drawn from the fallback."""
    for k, request in enumerate(requests):
        left = open_attributes(request, names)
        if not left:
            continue
        label = request.text or "(no attributes)"
        if resolved.open == "data":
            block = resolved.attrs[k * n:(k + 1) * n]
            data = resolved.conditionals[k].marginals()  # the distribution the rows were drawn from
            shown = ", ".join(f"{a} {block[:, names.index(a)].mean().item():.2f} (data {data[names.index(a)]:.2f})"
                              for a in left)
            log(f"'{label}': open attributes drawn from the data, frequency over {n} samples: {shown}")
        elif resolved.open == "model":
            log(f"'{label}': left open (hidden by the model, trained with attr_dropout): {', '.join(left)}")
        else:
            log(f"'{label}': open attributes taken as absent (open=absent): {', '.join(left)}")
    for note in resolved.notes:
        log(f"note: {note}")


def save_samples(folder: str | Path, samples: Samples, names: list[str], n: int) -> Path:
    """Write every sample as its own PNG (``00000.png``, ...) and ``samples.csv``: per file the request, what an
    open attribute meant, the whole row it was conditioned on, which attributes were drawn and from what
    (``exact``: the training rows that agree with the request; else the fallback's rule); returns the CSV."""
    folder = Path(folder)
    writer_rows = []
    for b, (image, row) in enumerate(zip(to_pil(samples.images), samples.rows.tolist())):
        request = samples.requests[b // n]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write_bytes(folder / f"{b:05d}.png", buf.getvalue())
        data = samples.resolved.open == "data"
        drawn = open_attributes(request, names) if data else []
        rule = samples.resolved.conditionals[b // n].rule if data else ""
        writer_rows.append([f"{b:05d}.png", request.text, samples.resolved.open,
                            *(int(v > 0.5) for v in row), ";".join(drawn), rule])
    text = io.StringIO()
    out = csv.writer(text, lineterminator="\n")
    out.writerow(["file", "request", "open", *names, "drawn", "drawn_from"])
    out.writerows(writer_rows)
    path = folder / "samples.csv"
    atomic_write_bytes(path, text.getvalue().encode())
    return path


def sample_sheet(run: LoadedRun, sets: list[str], settings: SamplingSettings | Mapping | None = None, *, n: int = 16,
                 compose: str | None = None, mode: str = "latents", cols: int = 8,
                 log: Callable[[str], None] = print) -> tuple[list[torch.Tensor], list[str], Samples]:
    """Sample ``n`` images per attribute request of ``sets`` (:func:`sample_requests`) and lay them out: rows of
    ``cols`` per request, or for mode x0-strip the predicted x0 at up to 12 steps, a row per sample. Returns the
    grid rows, their captions and the samples."""
    samples = sample_requests(run, sets, settings, n=n, compose=compose, mode=mode, log=log)
    labels = [compose] if compose else list(sets) or [""]
    rows, captions = [], []
    if mode == "x0-strip":  # row b: predicted x0 of sample b at (up to) 12 evenly spaced steps
        strips = samples.strips
        picks = torch.linspace(0, len(strips) - 1, min(12, len(strips))).round().long().tolist()
        for b in range(len(samples.images)):
            rows.append(torch.stack([strips[i][b] for i in picks]).float())
            captions.append(f"{labels[b // n] or '(no attributes)'}: x0 at steps {[i + 1 for i in picks]}")
    else:
        for label, block in zip(labels, samples.images.split(n)):
            for j, row in enumerate(block.split(cols)):
                rows.append(row)
                captions.append((label or "(no attributes)") if j == 0 else "")
    return rows, captions, samples


def sheet_name(mode: str, sets: list[str]) -> str:
    """The default file name of a sample sheet: the mode and the requests, made file-safe."""
    slug = "_".join(re.sub(r"[^A-Za-z0-9_]+", "-", x) for x in sets if x) or "none"
    return f"{mode}_{slug[:80]}.png"


def edit_sheet(run: LoadedRun, image_file: str | Path, edits: list[str], settings: SamplingSettings | Mapping | None = None,
               *, source: str | Callable[[torch.Tensor], torch.Tensor] | None = None, method: str = "both", n: int = 4,
               strength: float | None = None, iters: int = 3, log: Callable[[str], None] = print
               ) -> tuple[list[torch.Tensor], list[str]]:
    """The image beside ``n`` edits per request and method (invert, sdedit or both); returns rows and captions.
    The source attributes are ``source``: a request naming them (``"circle,red,large"``), or a function reading
    them from the image (launch/sample.py passes :func:`gmmcond.eval.evaluator.attribute_reader`, the run's
    evaluator). Changed in 0.2: ``source_attrs`` and ``read_source`` became ``source``; the sampler, steps,
    guidance, seed and precision moved into ``settings``."""
    settings = SamplingSettings.of_run(run.cfg, settings)
    parts, names = run.parts, run.parts.attr_names
    if not parts.conditioner.dim:
        raise RunError("--edit needs a run trained with a conditioner; this run is unconditional")
    if not edits:
        raise RunError('--edit needs at least one --attrs edit request, e.g. --attrs "square,blue"')
    image = read_image(Path(image_file), parts.dataset.size)
    if isinstance(source, str) and source:
        source_row = parse_attrs(source, names, parts.groups)
    elif callable(source):
        source_row = source(image)
    else:
        raise RunError("--edit needs the image's attributes: give --source-attrs")
    log(f"source attributes: {describe(source_row, names)} (an edit keeps this whole row and changes only what it "
        f"names, so nothing is open and --open does not apply)")
    targets = [apply_edit(source_row[None], parse_expr(r, names, parts.groups), names, parts.groups)[0] for r in edits]
    labels = [describe(t, names) for t in targets]
    for request, label in zip(edits, labels):
        log(f"edit '{request}' asks for: {label}")
    device = device_of_choice()
    parts.denoiser.to(device)
    methods = ("invert", "sdedit") if method == "both" else (method,)
    with settings.autocast(run.cfg, device):
        return edit_rows(parts, image, source_row, targets, labels, settings, methods=methods, n=n, strength=strength,
                         iters=iters)
