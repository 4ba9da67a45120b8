"""The embedded default dataset: coloured shapes rendered procedurally from (seed, index), no files.

Eleven binary attributes: two mutually exclusive groups (shape: circle/square/triangle; colour:
red/green/blue) and five independent, intersecting features (large, left, top, dark_bg, outline).
``label_mode="classes"`` gives instead the one-hot shape x colour class (9 classes), the disjoint
labelling of the paper's class-conditioned model. Images are drawn 4x larger and box-filtered down.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..registry import DATASETS

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
FEATURES = ("large", "left", "top", "dark_bg", "outline")
ATTR_NAMES = SHAPES + COLOURS + FEATURES
CLASS_NAMES = tuple(f"{s}_{c}" for s in SHAPES for c in COLOURS)

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
BACKGROUNDS = {True: (25, 25, 35), False: (225, 225, 215)}  # keyed by dark_bg
OUTLINE = (245, 180, 0)
RADIUS = {True: 0.30, False: 0.20}  # keyed by large, as a fraction of the image size
OFFSET = 0.15  # centre offset from the middle for left/right and top/bottom, fraction of the size
JITTER = 0.03  # uniform jitter of the centre, fraction of the size
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeParams:
    """Everything the renderer draws: the attributes and the exact geometry."""

    shape: str
    colour: str
    large: bool
    left: bool
    top: bool
    dark_bg: bool
    outline: bool
    cx: float  # centre, fraction of the size
    cy: float
    radius: float  # fraction of the size

    def attrs(self) -> np.ndarray:
        """Return the 11 binary attributes in ``ATTR_NAMES`` order."""
        on = {self.shape, self.colour} | {f for f in FEATURES if getattr(self, f)}
        return np.array([name in on for name in ATTR_NAMES], dtype=np.float32)

    def class_index(self) -> int:
        """Return the shape x colour class index into ``CLASS_NAMES``."""
        return SHAPES.index(self.shape) * len(COLOURS) + COLOURS.index(self.colour)


def draw_params(rng: random.Random) -> ShapeParams:
    """Draw one image's attributes (uniform groups, fair coins) and jittered geometry."""
    shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    large, left, top, dark_bg, outline = (rng.random() < 0.5 for _ in FEATURES)
    cx = 0.5 + (-OFFSET if left else OFFSET) + rng.uniform(-JITTER, JITTER)
    cy = 0.5 + (-OFFSET if top else OFFSET) + rng.uniform(-JITTER, JITTER)
    radius = RADIUS[large] * rng.uniform(0.94, 1.06)
    return ShapeParams(shape, colour, large, left, top, dark_bg, outline, cx, cy, radius)


def polygon(params: ShapeParams, size: float) -> list[tuple[float, float]] | None:
    """Return the polygon of a square or triangle in pixels of an image of ``size`` (None for a circle)."""
    cx, cy, r = params.cx * size, params.cy * size, params.radius * size
    if params.shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if params.shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    return None


def render(params: ShapeParams, size: int) -> Image.Image:
    """Render one RGB image of ``size`` x ``size`` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[params.dark_bg])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[params.colour]
    outline = OUTLINE if params.outline else None
    width = max(1, round(0.2 * params.radius * big)) if params.outline else 0
    poly = polygon(params, big)
    if poly is None:
        r = params.radius * big
        box = (params.cx * big - r, params.cy * big - r, params.cx * big + r, params.cy * big + r)
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)
    return image.resize((size, size), Image.BOX)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@DATASETS.register("shapes")
class ShapesDataset(Dataset):
    """Procedural coloured shapes; item ``i`` is the same image on every machine and every call."""

    def __init__(
        self,
        *,
        size: int = 16,  # Image side in pixels, 16 to 64.
        length: int = 20000,  # Images per epoch.
        seed: int = 0,  # Dataset seed; split "test" draws from a disjoint stream.
        split: str = "train",  # train | test
        label_mode: str = "features",  # features: 11 attributes; classes: one-hot shape x colour.
    ):
        if not 16 <= size <= 64:
            raise DatasetError(f"dataset.size must be between 16 and 64 for shapes, got {size}")
        if split not in ("train", "test"):
            raise DatasetError(f"dataset.split must be 'train' or 'test', got '{split}'")
        if label_mode not in ("features", "classes"):
            raise DatasetError(f"dataset.label_mode must be 'features' or 'classes', got '{label_mode}'")
        self.size, self.length, self.seed, self.split, self.label_mode = size, length, seed, split, label_mode
        if label_mode == "features":
            self.attr_names = list(ATTR_NAMES)
            self.groups = [list(SHAPES), list(COLOURS)]
        else:
            self.attr_names = list(CLASS_NAMES)
            self.groups = [list(CLASS_NAMES)]

    def params(self, index: int) -> ShapeParams:
        """Return the drawn parameters of item ``index``."""
        return draw_params(random.Random(f"shapes/{self.seed}/{self.split}/{index}"))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        params = self.params(index)
        if self.label_mode == "features":
            attrs = torch.from_numpy(params.attrs())
        else:
            attrs = torch.zeros(len(CLASS_NAMES))
            attrs[params.class_index()] = 1
        return to_tensor(render(params, self.size)), attrs, index
