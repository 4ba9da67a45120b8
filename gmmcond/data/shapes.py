"""The embedded default dataset: coloured shapes rendered procedurally from (seed, index), no files.

Eleven binary attributes: two mutually exclusive groups (shape: circle/square/triangle; colour:
red/green/blue) and five independent, intersecting features (large, left, top, dark_bg, outline).
``label_mode="classes"`` gives instead the one-hot shape x colour class (9 classes), the disjoint
labelling of the paper's class-conditioned model; ``label_mode="combinations"`` the one-hot class over
every attribute combination that occurs (3 x 3 x 2^5 = 288), the same information as the features. Images are drawn 4x larger and box-filtered down.

Within an attribute set the images vary (``variation=1``, the default): the centre lies anywhere in its
half (a margin keeps left/top decidable and the shape inside), the radius anywhere in its size class,
squares and triangles are rotated, and the fill and background shades vary within their class. Every
nuisance value is exact in :class:`ShapeParams`. ``variation=0`` is the earlier near-fixed geometry
(centre jitter +-0.03, radius +-6%), image for image.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..registry import DATASETS, EVAL_PROTOCOLS
from .protocol import EvaluationProtocol, Reference

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
FEATURES = ("large", "left", "top", "dark_bg", "outline")
ATTR_NAMES = SHAPES + COLOURS + FEATURES
CLASS_NAMES = tuple(f"{s}_{c}" for s in SHAPES for c in COLOURS)
# one name per attribute combination: the present attributes joined by "+", in ATTR_NAMES order
COMBINATION_NAMES = tuple("+".join([s, c, *(f for f, on in zip(FEATURES, bits) if on)])
                          for s in SHAPES for c in COLOURS for bits in itertools.product((0, 1), repeat=len(FEATURES)))
LABEL_MODES = ("features", "classes", "combinations")

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
BACKGROUNDS = {True: (25, 25, 35), False: (225, 225, 215)}  # keyed by dark_bg
OUTLINE = (245, 180, 0)
RADIUS = {True: 0.30, False: 0.20}  # keyed by large, as a fraction of the image size
OFFSET = 0.15  # centre offset from the middle for left/right and top/bottom, fraction of the size
JITTER = 0.03  # uniform jitter of the centre, fraction of the size
SUPERSAMPLE = 4
# variation = 1: ranges of the nuisances
RADIUS_RANGE = {True: (0.27, 0.32), False: (0.16, 0.21)}  # keyed by large; areas stay >= 1.65x apart
MIN_OFFSET = 0.08  # the centre is at least this far from the middle, so left/top stay decidable
MARGIN = 0.01  # between the shape's farthest point and the border
SHADE = 0.2  # fill brightness factor in [1 - SHADE, 1 + SHADE]
BG_SHADE = 30  # background shifts by up to this many levels toward mid-grey
PERIOD = {"circle": 0.0, "square": math.pi / 2, "triangle": 2 * math.pi / 3}  # rotational symmetry
EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.0}  # farthest point / radius, any rotation
NUISANCES = ("cx", "cy", "radius", "angle", "fill_shade", "bg_shade")
# what the evaluator regresses: the nuisances, the angle as (cos, sin) of its fraction of the symmetry period
NUISANCE_COLUMNS = ("cx", "cy", "radius", "angle_cos", "angle_sin", "fill_shade", "bg_shade")
EVALUATOR_ITEMS = 16384  # training images of a shapes evaluator
# keys a run directory written before they existed does not record, with the values that reproduce it
LEGACY_DEFAULTS = {"variation": 0.0}  # before shapes varied within an attribute set: the old geometry


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
    angle: float = 0.0  # rotation in radians, in [0, PERIOD[shape]) (0 for circles)
    fill_shade: float = 1.0  # fill brightness factor
    bg_shade: float = 0.0  # background levels moved toward mid-grey

    def nuisances(self) -> np.ndarray:
        """Return the nuisance values in ``NUISANCES`` order (angle as a fraction of the shape's period)."""
        period = PERIOD[self.shape]
        return np.array([self.cx, self.cy, self.radius, self.angle / period if period else 0.0, self.fill_shade,
                         self.bg_shade], dtype=np.float32)

    def attrs(self) -> np.ndarray:
        """Return the 11 binary attributes in ``ATTR_NAMES`` order."""
        on = {self.shape, self.colour} | {f for f in FEATURES if getattr(self, f)}
        return np.array([name in on for name in ATTR_NAMES], dtype=np.float32)

    def class_index(self) -> int:
        """Return the shape x colour class index into ``CLASS_NAMES``."""
        return SHAPES.index(self.shape) * len(COLOURS) + COLOURS.index(self.colour)

    def combination_index(self) -> int:
        """Return the index of this attribute combination into ``COMBINATION_NAMES``."""
        bits = sum(int(getattr(self, f)) << (len(FEATURES) - 1 - k) for k, f in enumerate(FEATURES))
        return self.class_index() * 2 ** len(FEATURES) + bits


def draw_params(rng: random.Random, variation: float = 1.0, attrs: dict | None = None) -> ShapeParams:
    """Draw one image's attributes (uniform groups, fair coins; or ``attrs`` as given) and its nuisances.

    The draws of ``variation=0`` come first, so variation 0 reproduces the earlier geometry exactly;
    a variation in (0, 1] blends each nuisance toward its full range.
    """
    shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    large, left, top, dark_bg, outline = (rng.random() < 0.5 for _ in FEATURES)
    if attrs is not None:  # the same random stream, with the attributes fixed (a redraw of nuisances)
        shape, colour = attrs["shape"], attrs["colour"]
        large, left, top, dark_bg, outline = (attrs[f] for f in FEATURES)
    jx, jy = rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)
    radius = RADIUS[large] * rng.uniform(0.94, 1.06)
    if variation == 0:
        return ShapeParams(shape, colour, large, left, top, dark_bg, outline, 0.5 + (-OFFSET if left else OFFSET) + jx,
                           0.5 + (-OFFSET if top else OFFSET) + jy, radius)
    ur, ux, uy, ua, uf, ub = (rng.random() for _ in range(6))
    lo, hi = RADIUS_RANGE[large]
    radius = (1 - variation) * radius + variation * (lo + ur * (hi - lo))
    far = 0.5 - EXTENT[shape] * radius - MARGIN  # the largest offset from the middle that keeps the shape inside
    ox = (1 - variation) * (OFFSET + jx) + variation * (MIN_OFFSET + ux * (far - MIN_OFFSET))
    oy = (1 - variation) * (OFFSET + jy) + variation * (MIN_OFFSET + uy * (far - MIN_OFFSET))
    return ShapeParams(shape, colour, large, left, top, dark_bg, outline, 0.5 - ox if left else 0.5 + ox,
                       0.5 - oy if top else 0.5 + oy, radius, angle=variation * ua * PERIOD[shape],
                       fill_shade=1 + variation * SHADE * (2 * uf - 1), bg_shade=variation * BG_SHADE * ub)


def fixed_attrs(params: ShapeParams) -> dict:
    """Return the attributes of ``params`` in the form :func:`draw_params` takes to redraw only the nuisances."""
    return {"shape": params.shape, "colour": params.colour, **{f: getattr(params, f) for f in FEATURES}}


def background(params: ShapeParams) -> tuple[int, int, int]:
    """Return the background colour of an image: its class colour moved ``bg_shade`` levels toward grey."""
    base = BACKGROUNDS[params.dark_bg]
    step = params.bg_shade if params.dark_bg else -params.bg_shade
    return tuple(int(round(c + step)) for c in base)


def fill_colour(params: ShapeParams) -> tuple[int, int, int]:
    """Return the fill colour: the palette colour scaled by ``fill_shade``."""
    return tuple(int(round(min(255, c * params.fill_shade))) for c in PALETTE[params.colour])


def polygon(params: ShapeParams, size: float) -> list[tuple[float, float]] | None:
    """Return the polygon of a square or triangle in pixels of an image of ``size`` (None for a circle)."""
    cx, cy, r = params.cx * size, params.cy * size, params.radius * size
    if params.shape == "square":
        h = r * 0.85
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif params.shape == "triangle":
        corners = [(0.0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
    else:
        return None
    c, s = math.cos(params.angle), math.sin(params.angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in corners]


def render(params: ShapeParams, size: int) -> Image.Image:
    """Render one RGB image of ``size`` x ``size`` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background(params))
    draw = ImageDraw.Draw(image)
    fill = fill_colour(params)
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


# --- the defect rule: what a correct image of this renderer looks like ---------------------------------------------------------

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
_BACKGROUNDS = np.array([BACKGROUNDS[True], BACKGROUNDS[False]], dtype=np.float32)


def expected_area(shape: str, large: bool, size: int, radius: float | None = None) -> float:
    """Area in pixels of a shape drawn at ``radius`` (default the nominal radius of its size class)."""
    r = (RADIUS[large] if radius is None else radius) * size
    if shape == "circle":
        return math.pi * r * r
    if shape == "square":
        return (2 * 0.85 * r) ** 2
    return 0.5 * (2 * 0.95 * r) * (1.75 * r)  # triangle: base 1.9 r, height 1.75 r


def radius_range(large: bool) -> tuple[float, float]:
    """The smallest and largest radius of a size class over every ``variation`` of the renderer."""
    lo, hi = RADIUS_RANGE[large]
    return min(lo, 0.94 * RADIUS[large]), max(hi, 1.06 * RADIUS[large])


@dataclass
class ShapeCheck:
    """The renderer-based verdict on one image and the measurements behind it."""

    defect: bool
    reason: str  # "ok" or a category: no plain background, empty, several objects, wrong area, lopsided, impure colour
    components: int
    area: float
    detail: str = ""  # the measurement behind the reason


MAX_ELONGATION = 1.45  # regular polygons and discs have isotropic second moments (ratio 1 at any rotation)


def _elongation(mask: np.ndarray) -> float:
    """Return sqrt(largest / smallest eigenvalue) of the pixel coordinates' covariance: 1 for round objects;
    a half-drawn disc or square reads about 1.9-2."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return float("inf")
    eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12)  # + pixel extent
    return float(math.sqrt(eig[1] / eig[0]))


def check_image(image: torch.Tensor, attrs: torch.Tensor | None = None) -> ShapeCheck:
    """Decide if a shapes image is broken: no plain background, empty, several objects, wrong area, lopsided,
    impure colour.

    ``attrs`` (the requested attributes) sets the expected area; without it any nominal area is accepted.
    """
    rgb = ((image.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    size = rgb.shape[0]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    dist_bg = np.linalg.norm(_BACKGROUNDS[:, None, :] - border[None], axis=-1)  # [2, n_border]
    bg_index = int(np.argmin(np.median(dist_bg, 1)))
    bg_close = dist_bg[bg_index] < 60
    if bg_close.mean() < 0.6:
        return ShapeCheck(True, "no plain background", 0, 0.0)
    fg = np.linalg.norm(rgb - _BACKGROUNDS[bg_index], axis=-1) > 70  # clearly not background
    labels, count = ndimage.label(fg)
    areas = np.bincount(labels.ravel())[1:] if count else np.array([])
    big = areas[areas >= 0.15 * expected_area("circle", False, size)] if count else areas
    if len(big) == 0:
        return ShapeCheck(True, "empty", int(count), 0.0)
    if len(big) > 1:
        return ShapeCheck(True, "several objects", int(len(big)), float(areas.sum()))
    area = float(areas.max())
    if attrs is not None:
        on = {ATTR_NAMES[k] for k in range(len(ATTR_NAMES)) if attrs[k] > 0.5}
        shape = next((s for s in SHAPES if s in on), None)
        shapes = [shape] if shape else list(SHAPES)
        r_lo, r_hi = radius_range("large" in on)
        lo = 0.8 * min(expected_area(s, "large" in on, size, r_lo) for s in shapes)
        hi = 1.75 * max(expected_area(s, "large" in on, size, r_hi) for s in shapes)  # outlines add area
    else:
        lo = 0.8 * expected_area("triangle", False, size, radius_range(False)[0])
        hi = 1.75 * expected_area("circle", True, size, radius_range(True)[1])
    if not lo <= area <= hi:
        return ShapeCheck(True, "wrong area", 1, area, f"area {area:.0f} outside [{lo:.0f}, {hi:.0f}]")
    mask = labels == (int(np.argmax(areas)) + 1)
    elongation = _elongation(mask)
    if elongation > MAX_ELONGATION:
        return ShapeCheck(True, "lopsided", 1, area, f"elongation {elongation:.2f} > {MAX_ELONGATION}")
    pixels = rgb[mask]
    near_fill = np.linalg.norm(pixels[:, None] - _PALETTE[None], axis=-1).min(1) < 70
    if near_fill.sum() < max(1, 0.1 * len(pixels)):  # no clean fill colour (small outlined shapes keep some)
        return ShapeCheck(True, "impure colour", 1, area)
    return ShapeCheck(False, "ok", 1, area)



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
        label_mode: str = "features",  # features: 11 attributes; classes: one-hot shape x colour; combinations: one-hot of all 288.
        variation: float = 1.0,  # Nuisance spread within an attribute set: 1 full, 0 the earlier near-fixed geometry.
        exclude: list | None = None,  # Attribute sets never shown, e.g. ["triangle,red"]: items holding all of one are redrawn.
    ):
        if not 16 <= size <= 64:
            raise DatasetError(f"dataset.size must be between 16 and 64 for shapes, got {size}")
        if split not in ("train", "test"):
            raise DatasetError(f"dataset.split must be 'train' or 'test', got '{split}'")
        if label_mode not in LABEL_MODES:
            raise DatasetError(f"dataset.label_mode must be one of {', '.join(LABEL_MODES)}, got '{label_mode}'")
        if not 0 <= variation <= 1:
            raise DatasetError(f"dataset.variation must be in [0, 1], got {variation}")
        self.size, self.length, self.seed, self.split, self.label_mode = size, length, seed, split, label_mode
        self.variation = variation
        self.exclude = [self._parse_exclude(e) for e in exclude or []]
        self.attr_names = {"features": list(ATTR_NAMES), "classes": list(CLASS_NAMES),
                           "combinations": list(COMBINATION_NAMES)}[label_mode]
        self.groups = [list(SHAPES), list(COLOURS)] if label_mode == "features" else [list(self.attr_names)]
        # the evaluator's attributes a label fixes (the rest is left to the model)
        self.known_features = list(SHAPES + COLOURS) if label_mode == "classes" else list(ATTR_NAMES)

    @staticmethod
    def _parse_exclude(text: str) -> set[str]:
        names = {t.strip() for t in str(text).split(",") if t.strip()}
        unknown = sorted(names - set(ATTR_NAMES))
        if unknown or not names:
            raise DatasetError(f"dataset.exclude: '{text}' must list attribute names from {', '.join(ATTR_NAMES)}"
                               + (f"; unknown {unknown}" if unknown else ""))
        return names

    def excluded(self, params: ShapeParams) -> bool:
        """Whether ``params`` holds every attribute of one excluded set."""
        on = {ATTR_NAMES[k] for k, v in enumerate(params.attrs()) if v > 0.5}
        return any(e <= on for e in self.exclude)

    def params(self, index: int) -> ShapeParams:
        """Return the drawn parameters of item ``index`` (redrawn from the next stream while excluded)."""
        for attempt in range(1000):
            key = f"shapes/{self.seed}/{self.split}/{index}" + (f"/{attempt}" if attempt else "")
            params = draw_params(random.Random(key), self.variation)
            if not self.excluded(params):
                return params
        raise DatasetError(f"dataset.exclude {self.exclude} leaves no images")

    def redraw(self, index: int, stream: int = 1) -> ShapeParams:
        """Return item ``index``'s attributes with fresh nuisances (a real reference with the same attribute row)."""
        params = self.params(index)
        rng = random.Random(f"shapes/{self.seed}/{self.split}/{index}/redraw{stream}")
        return draw_params(rng, self.variation, fixed_attrs(params))

    def image(self, params: ShapeParams) -> torch.Tensor:
        """Render ``params`` at this dataset's size as a tensor in [-1, 1]."""
        return to_tensor(render(params, self.size))

    def __len__(self) -> int:
        return self.length

    def labels(self, params: ShapeParams) -> torch.Tensor:
        """The attribute row of ``params`` under this dataset's ``label_mode``."""
        if self.label_mode == "features":
            return torch.from_numpy(params.attrs())
        attrs = torch.zeros(len(self.attr_names))
        attrs[params.class_index() if self.label_mode == "classes" else params.combination_index()] = 1
        return attrs

    def attribute_rows(self) -> torch.Tensor:
        """Every item's attribute row [N, K], drawn without rendering (the run's attribute prior counts them)."""
        if not self.length:
            return torch.zeros(0, len(self.attr_names))
        return torch.stack([self.labels(self.params(i)) for i in range(self.length)])

    def __getitem__(self, index: int):
        params = self.params(index)
        return to_tensor(render(params, self.size)), self.labels(params), index


def defined_columns(shape: str) -> list[bool]:
    """Which of ``NUISANCE_COLUMNS`` a shape defines: all but the angle for a circle (its rotation is undefined)."""
    return [not (shape == "circle" and c.startswith("angle")) for c in NUISANCE_COLUMNS]


@EVAL_PROTOCOLS.register("shapes")
class ShapesProtocol(EvaluationProtocol):
    """Evaluating a shapes model: the renderer knows every image exactly, so the reference redraws A's rows
    with fresh nuisances, the defect rule is the renderer's (:func:`check_image`), and the evaluator also
    regresses the nuisances. Every attribute set comes back (``exclude`` cleared, so held-out combinations are
    evaluated), and a run labelled by classes or combinations is scored on the 11 features."""

    can_redraw = True
    has_defect_rule = True
    nuisance_columns = NUISANCE_COLUMNS

    @classmethod
    def views(cls, dataset_cfg: dict) -> tuple[ShapesDataset, ShapesDataset]:
        test = DATASETS.build(dict(dataset_cfg, split="test"))
        kw = dict(size=test.size, length=test.length, seed=test.seed, split="test", variation=test.variation)
        return ShapesDataset(label_mode=test.label_mode, **kw), ShapesDataset(label_mode="features", **kw)

    def rows(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.eval_set.params(i).attrs() for i in indices]))

    def requested(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The features rows; a class label fixes shape and colour only (``known_features``)."""
        rows = self.rows(range(n))
        fixed = self.cond_set.known_features
        return rows, torch.tensor([float(nm in fixed) for nm in self.attr_names]).expand_as(rows)

    def reference(self, n: int) -> Reference:
        self.check_size(n)
        images = torch.stack([self.eval_set.image(self.eval_set.redraw(i)) for i in range(n)])
        return Reference(images, self.rows(range(n)), "same attribute rows, nuisances redrawn", 1.0)

    def defect(self, image: torch.Tensor, attrs: torch.Tensor | None) -> ShapeCheck:
        return check_image(image, attrs)

    def set_draws(self, index: int, count: int, stream: int) -> torch.Tensor:
        return torch.stack([self.eval_set.image(self.eval_set.redraw(index, stream + r)) for r in range(count)])

    def nuisance_valid(self, index: int) -> list[bool]:
        return defined_columns(self.eval_set.params(index).shape)

    @classmethod
    def training_config(cls, dataset_cfg: dict) -> dict:
        return dict(sorted({**super().training_config(dataset_cfg), "label_mode": "features",
                            "length": EVALUATOR_ITEMS}.items()))

    @classmethod
    def scoring_config(cls, dataset_cfg: dict, n: int) -> dict:
        return dict(super().scoring_config(dataset_cfg, n), length=n)

    @classmethod
    def nuisance_targets(cls, dataset: ShapesDataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets in ``NUISANCE_COLUMNS`` order and a mask (a circle's angle is undefined)."""
        rows, masks = [], []
        for i in indices:
            p = dataset.params(i)
            v = p.nuisances()  # cx, cy, radius, angle fraction, fill_shade, bg_shade
            turn = 2 * math.pi * float(v[3])
            rows.append([v[0], v[1], v[2], math.cos(turn), math.sin(turn), v[4], v[5] / BG_SHADE])
            masks.append(defined_columns(p.shape))
        return torch.tensor(rows, dtype=torch.float32), torch.tensor(masks, dtype=torch.float32)
