"""Offline evaluation without downloaded weights: an oracle attribute classifier trained on the run's own
data, attribute accuracy of conditional samples, defects, and a Frechet distance in oracle features.

Defects on ``shapes`` are measured from the image itself with what the renderer knows (plain background
from a two-colour set, one connected foreground object, an area that fits the requested size, a fill
colour from the palette), beside the oracle's confidence. For datasets without a renderer, a sample is a
defect when the oracle is unsure within a mutually exclusive group or when its oracle features lie farther
from every real image than 99% of real held-out images do.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..data import shapes as S
from ..errors import DatasetError
from ..io import write_json


class Oracle(nn.Module):
    """A small CNN attribute classifier; ``features`` gives its penultimate layer for Frechet distances."""

    def __init__(self, num_attrs: int, size: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 128), nn.GELU(),
        )
        self.out = nn.Linear(128, num_attrs)
        self.size = size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the 128-d penultimate features of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def stack_items(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``n`` images and attributes of a dataset as two tensors."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


def train_oracle(train_x, train_y, *, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0) -> Oracle:
    """Train the oracle with BCE on real images (light jitter: 1-pixel shifts)."""
    torch.manual_seed(seed)
    oracle = Oracle(train_y.shape[1], train_x.shape[-1])
    opt = torch.optim.AdamW(oracle.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (batch,), generator=gen)
        x = train_x[idx]
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, (dy, dx), (2, 3))
        loss = nn.functional.binary_cross_entropy_with_logits(oracle(x), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return oracle.eval()


@torch.no_grad()
def save_oracle(path: Path, oracle: Oracle, dataset_cfg: dict, size: int) -> None:
    """Cache an oracle as safetensors, with the dataset config it was trained on in the metadata."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path),
              metadata={"dataset": json.dumps(dataset_cfg, sort_keys=True), "size": str(size)})


def load_oracle(path: Path, dataset_cfg: dict, num_attrs: int) -> Oracle | None:
    """Load a cached oracle if it exists and was trained on ``dataset_cfg``; else None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("dataset") != json.dumps(dataset_cfg, sort_keys=True):
            return None
        state = {k: f.get_tensor(k) for k in f.keys()}
    oracle = Oracle(num_attrs, int(meta["size"]))
    oracle.load_state_dict(state)
    return oracle.eval()


def predict(oracle: Oracle, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Return oracle probabilities and features for images x."""
    probs, feats = [], []
    for chunk in x.split(batch):
        f = oracle.features(chunk)
        feats.append(f)
        probs.append(torch.sigmoid(oracle.out(f)))
    return torch.cat(probs), torch.cat(feats)


def attribute_scores(probs: torch.Tensor, attrs: torch.Tensor, names: list[str]) -> dict:
    """Per-attribute accuracy, its mean, and the all-attributes-correct rate."""
    correct = (probs > 0.5).float() == attrs
    per = {n: correct[:, k].float().mean().item() for k, n in enumerate(names)}
    return {"per_attribute": per, "mean_accuracy": correct.float().mean().item(), "all_correct": correct.all(1).float().mean().item()}


def group_confidence(probs: torch.Tensor, names: list[str], groups: list[list[str]]) -> torch.Tensor:
    """Return, per image, the lowest over groups of the highest member probability (1 if no groups)."""
    conf = torch.ones(len(probs))
    for group in groups:
        cols = [names.index(g) for g in group]
        conf = torch.minimum(conf, probs[:, cols].max(1).values)
    return conf


# --- defects on shapes, from the image itself ---------------------------------------------------------

PALETTE = np.array([S.PALETTE[c] for c in S.COLOURS], dtype=np.float32)
BACKGROUNDS = np.array([S.BACKGROUNDS[True], S.BACKGROUNDS[False]], dtype=np.float32)


def expected_area(shape: str, large: bool, size: int) -> float:
    """Area in pixels of a shape drawn at the nominal radius (the renderer's geometry)."""
    r = S.RADIUS[large] * size
    if shape == "circle":
        return math.pi * r * r
    if shape == "square":
        return (2 * 0.85 * r) ** 2
    return 0.5 * (2 * 0.95 * r) * (1.75 * r)  # triangle: base 1.9 r, height 1.75 r


@dataclass
class ShapeCheck:
    """The renderer-based verdict on one image and the measurements behind it."""

    defect: bool
    reason: str
    components: int
    area: float


def check_shape_image(image: torch.Tensor, attrs: torch.Tensor | None = None) -> ShapeCheck:
    """Decide if a shapes image is broken: no plain background, empty, several objects, wrong area, impure colour.

    ``attrs`` (the requested attributes) sets the expected area; without it any nominal area is accepted.
    """
    rgb = ((image.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    size = rgb.shape[0]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    dist_bg = np.linalg.norm(BACKGROUNDS[:, None, :] - border[None], axis=-1)  # [2, n_border]
    bg_index = int(np.argmin(np.median(dist_bg, 1)))
    bg_close = dist_bg[bg_index] < 60
    if bg_close.mean() < 0.6:
        return ShapeCheck(True, "no plain background", 0, 0.0)
    fg = np.linalg.norm(rgb - BACKGROUNDS[bg_index], axis=-1) > 70  # clearly not background
    labels, count = ndimage.label(fg)
    areas = np.bincount(labels.ravel())[1:] if count else np.array([])
    big = areas[areas >= 0.15 * expected_area("circle", False, size)] if count else areas
    if len(big) == 0:
        return ShapeCheck(True, "empty", int(count), 0.0)
    if len(big) > 1:
        return ShapeCheck(True, "several objects", int(len(big)), float(areas.sum()))
    area = float(areas.max())
    if attrs is not None:
        on = {S.ATTR_NAMES[k] for k in range(len(S.ATTR_NAMES)) if attrs[k] > 0.5}
        shape = next((s for s in S.SHAPES if s in on), None)
        sizes = [expected_area(shape, "large" in on, size)] if shape else [expected_area(s, "large" in on, size) for s in S.SHAPES]
        lo, hi = 0.8 * min(sizes), 1.75 * max(sizes)  # real shapes: 0.84 to 1.64 of nominal (outline, jitter)
    else:
        lo, hi = 0.8 * expected_area("triangle", False, size), 1.75 * expected_area("circle", True, size)
    if not lo <= area <= hi:
        return ShapeCheck(True, f"area {area:.0f} outside [{lo:.0f}, {hi:.0f}]", 1, area)
    pixels = rgb[labels == (int(np.argmax(areas)) + 1)]
    near_fill = np.linalg.norm(pixels[:, None] - PALETTE[None], axis=-1).min(1) < 70
    if near_fill.sum() < max(1, 0.1 * len(pixels)):  # no clean fill colour (small outlined shapes keep some)
        return ShapeCheck(True, "impure colour", 1, area)
    return ShapeCheck(False, "ok", 1, area)


def nearest_real_distance(feats: torch.Tensor, real: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Return each feature row's Euclidean distance to its nearest real feature row."""
    d = torch.cdist(feats, real)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values


def heldout_config(dataset_cfg: dict) -> dict:
    """Return the dataset config of the held-out split (the oracle's test data and the attribute sets)."""
    cfg = dict(dataset_cfg)
    if cfg["type"] in ("shapes", "cifar10", "celeba"):
        cfg["split"] = "test"
    return cfg


def oracle_dataset_config(dataset_cfg: dict) -> dict:
    """The data the oracle learns from: shapes always with their 11 features (class runs included)."""
    cfg = dict(dataset_cfg)
    if cfg["type"] == "shapes":
        cfg["label_mode"] = "features"
        cfg["length"] = max(cfg.get("length", 0), 8192)
    return cfg


def requested_features(attrs: torch.Tensor, names: list[str], oracle_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a run's attribute rows onto the oracle's attributes; return targets and a mask of those known.

    Identity for feature runs; for a shapes class run ("circle_red") only the shape and colour are known.
    """
    if names == oracle_names:
        return attrs, torch.ones_like(attrs)
    target, known = torch.zeros(len(attrs), len(oracle_names)), torch.zeros(len(attrs), len(oracle_names))
    for k, name in enumerate(names):
        parts = name.split("_")
        cols = [oracle_names.index(p) for p in parts if p in oracle_names]
        if len(cols) != len(parts):
            raise DatasetError(f"cannot map attribute '{name}' onto the oracle's attributes {oracle_names}")
        rows = attrs[:, k] > 0.5
        for group in (S.SHAPES, S.COLOURS):
            gcols = [oracle_names.index(g) for g in group]
            known[:, gcols] = 1
        target[rows.nonzero().flatten()[:, None], torch.tensor(cols)] = 1
    return target, known


def evaluate_run(run_dir: str | Path, *, n: int = 512, steps: int | None = None, sampler=None, cfg_scale: float | None = None,
                 seed: int = 0, batch: int = 64, oracle_steps: int = 2000, progress: bool = True,
                 oracle_cache: Path | None = None, precision: str | None = None) -> dict:
    """Evaluate a trained run offline; writes ``eval.json``, ``oracle.pt`` (cache) and ``eval_worst.png``."""
    import k_diffusion as K
    from tqdm.auto import tqdm

    from ..engine.precision import autocast, sampling_precision
    from ..engine.runs import load_run
    from ..registry import DATASETS
    from ..sampling.generate import generate
    from ..visualize import captioned_grid, save_png

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg, parts = run.cfg, run.parts
    oracle_cfg = oracle_dataset_config(cfg["dataset"])
    train_set, test_set = DATASETS.build(oracle_cfg), DATASETS.build(heldout_config(oracle_cfg))
    oracle_names = list(train_set.attr_names)
    cache = Path(oracle_cache) if oracle_cache else run_dir / "oracle.safetensors"
    oracle = load_oracle(cache, oracle_cfg, len(oracle_names))
    if oracle is None:
        tx, ty = stack_items(train_set, 8192)
        oracle = train_oracle(tx, ty, steps=oracle_steps)
        save_oracle(cache, oracle, oracle_cfg, tx.shape[-1])
    real_x, real_y = stack_items(test_set, max(n, 1024))
    real_p, real_f = predict(oracle, real_x)
    oracle_scores = attribute_scores(real_p, real_y, oracle_names)

    run_test = DATASETS.build(heldout_config(cfg["dataset"]))
    cond_attrs = torch.stack([run_test[i][1] for i in range(n)])
    s = cfg["sample"]
    images = []
    device = next(parts.denoiser.parameters()).device
    precision = precision or sampling_precision(cfg, device.type)  # the run's own autocast, where this machine has it
    for i, chunk in enumerate(tqdm(cond_attrs.split(batch), desc="sample", disable=not progress)):
        with autocast(device, precision):
            images.append(generate(parts, chunk, sampler=sampler or s["sampler"], steps=steps or s["steps"],
                                   cfg_scale=s["cfg_scale"] if cfg_scale is None else cfg_scale, seed=seed + i).float())
    images = torch.cat(images)
    probs, feats = predict(oracle, images)
    target, known = requested_features(cond_attrs, parts.attr_names, oracle_names)
    correct = ((probs > 0.5).float() == target).float()
    per = {name: (correct[:, k][known[:, k] > 0]).mean().item() for k, name in enumerate(oracle_names) if known[:, k].any()}
    mean_acc = (correct * known).sum().item() / known.sum().item()
    all_correct = ((correct * known).sum(1) == known.sum(1)).float().mean().item()
    groups = [list(S.SHAPES), list(S.COLOURS)] if cfg["dataset"]["type"] == "shapes" else getattr(train_set, "groups", [])
    conf = group_confidence(probs, oracle_names, groups)
    reasons = []
    size_free = None
    if cfg["dataset"]["type"] == "shapes":
        for img, t, kn in zip(images, target, known):
            check = check_shape_image(img, t if kn.all() else None)  # a class run does not fix the size
            reasons.append(check.reason if check.defect else "ok")
        size_free = [check_shape_image(img).defect or c < 0.5 for img, c in zip(images, conf.tolist())]
        real_flags = [check_shape_image(img, y).defect for img, y in zip(real_x[:n], real_y[:n])]
        nn_threshold = None
    else:
        real_nn = nearest_real_distance(real_f, real_f, exclude_self=True)
        nn_threshold = torch.quantile(real_nn, 0.99).item()
        far = nearest_real_distance(feats, real_f) > nn_threshold
        reasons = ["far from real data" if f else "ok" for f in far.tolist()]
        real_flags = (group_confidence(real_p, oracle_names, groups) < 0.5).tolist()
    for i, c in enumerate(conf.tolist()):
        if reasons[i] == "ok" and c < 0.5:
            reasons[i] = "unsure oracle"
    defects = [r != "ok" for r in reasons]
    fd = K.evaluation.fid(feats, real_f[: len(feats)]).item()
    result = {
        "run": str(run_dir), "step": run.step, "n": n, "sampler": sampler or s["sampler"], "steps": steps or s["steps"],
        "cfg_scale": s["cfg_scale"] if cfg_scale is None else cfg_scale, "precision": precision,
        "oracle_heldout_accuracy": oracle_scores["mean_accuracy"], "oracle_heldout_per_attribute": oracle_scores["per_attribute"],
        "attribute_accuracy": mean_acc, "all_attributes_correct": all_correct, "per_attribute": per,
        "defect_rate": sum(defects) / len(defects),
        "defect_rate_size_free": None if size_free is None else sum(size_free) / len(size_free),  # same rule for class runs
        "defect_reasons": {r: reasons.count(r) for r in set(reasons) if r != "ok"},
        "real_heldout_defect_rate": sum(real_flags) / len(real_flags), "nn_threshold": nn_threshold,
        "frechet_distance": fd,
    }
    order = sorted(range(len(images)), key=lambda i: (not defects[i], conf[i].item()))[:32]
    rows = [images[order[j:j + 8]] for j in range(0, len(order), 8)]
    caps = [" | ".join(reasons[i][:14] for i in order[j:j + 8]) for j in range(0, len(order), 8)]
    save_png(captioned_grid(rows, caps, cell=64), run_dir / "eval_worst.png")
    write_json(run_dir / "eval.json", result)
    return result
