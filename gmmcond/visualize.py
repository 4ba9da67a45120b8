"""Pictures of a run: captioned sample grids, strips of predicted x0, loss curves."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .io import atomic_write_bytes


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert images [B, 3, H, W] in [-1, 1] to PIL images."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def save_png(image: Image.Image, path: Path) -> None:
    """Save a PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def captioned_grid(rows: Sequence[torch.Tensor], captions: Sequence[str], cell: int = 64, pad: int = 2) -> Image.Image:
    """Lay out rows of images [n, 3, H, W], each row with its caption written underneath."""
    text_h = 14
    cols = max(len(r) for r in rows)
    width = cols * (cell + pad) + pad
    height = len(rows) * (cell + pad + text_h) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (row, caption) in enumerate(zip(rows, captions)):
        y = pad + r * (cell + pad + text_h)
        for c, image in enumerate(to_pil(row)):
            canvas.paste(image.resize((cell, cell), Image.NEAREST), (pad + c * (cell + pad), y))
        draw.text((pad + 2, y + cell + 1), caption, fill=(0, 0, 0))
    return canvas


def pyplot():
    """Return matplotlib.pyplot on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(records: Sequence[dict], out: Path, keys: Sequence[str] = ("loss",)) -> None:
    """Plot the given metrics of metrics.jsonl records (``gmmcond.io.read_metrics``) against step into a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def save_figure(fig, path: str | Path, **options) -> None:
    """Save a matplotlib figure as PNG atomically (a full disk is one StorageError; the previous file stays)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **options)
    atomic_write_bytes(Path(path), buf.getvalue())
