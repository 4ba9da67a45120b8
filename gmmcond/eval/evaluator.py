"""The evaluator: attribute classifier, feature extractor and nuisance regressors in one small CNN.

For the default shapes data (16x16, variation 1) it is trained once by

    python launch/evaluate.py --train-evaluator

and committed as ``gmmcond/eval/weights/shapes16.safetensors`` with its training data config, that
config's hash and the command in the metadata, so the same sample files score the same numbers on every
machine. For other data it is trained on first use and cached under a key of the data config
(``$GMMCOND_CACHE``, default ``~/.cache/gmmcond/evaluators``); ``--evaluator PATH`` pins one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import sys

import torch
from torch import nn
from tqdm.auto import trange

from ..data.attrs import read_attributes
from ..data.protocol import EvaluationProtocol, protocol_class, stack_items
from ..errors import GmmcondError, RunError
from ..io import read_safetensors, write_safetensors
from ..registry import DATASETS
from ..utils import cache_root

FROZEN = Path(__file__).resolve().parent / "weights" / "shapes16.safetensors"
TRAIN_COMMAND = "python launch/evaluate.py --train-evaluator"
FEATURES = 64  # feature dimension: full-rank covariance over a few hundred images, so FD is well posed
TRAIN_ITEMS = 16384  # training images read (at most)
TRAIN_STEPS = 3000


class EvaluatorError(GmmcondError):
    """An evaluator file is missing, malformed, or made for other data."""


class Evaluator(nn.Module):
    """A small CNN: ``features`` (64-d, linear), attribute logits, and (for shapes) nuisance regression."""

    def __init__(self, num_attrs: int, num_nuisances: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, 128), nn.GELU(), nn.Linear(128, FEATURES),
        )
        self.attrs = nn.Linear(FEATURES, num_attrs)
        self.nuisances = nn.Linear(FEATURES, num_nuisances) if num_nuisances else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the 64-d features of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attrs(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Return attribute probabilities, features and regressed nuisances of images ``x``."""
        self.eval()
        out = {"probs": [], "features": [], "nuisances": []}
        for chunk in x.float().split(batch):
            f = self.features(chunk)
            out["features"].append(f)
            out["probs"].append(torch.sigmoid(self.attrs(f)))
            if self.nuisances is not None:
                out["nuisances"].append(self.nuisances(f))
        return {k: torch.cat(v) if v else None for k, v in out.items()}


@dataclass(frozen=True)
class EvaluatorData:
    """The data an evaluator of one dataset config learns from and is scored on, through that config's evaluation
    protocol (looked up once, here)."""

    dataset_cfg: dict
    protocol: type[EvaluationProtocol]

    @classmethod
    def of(cls, dataset: "dict | EvaluatorData") -> "EvaluatorData":
        """``dataset`` as is if it already is one, else the evaluator data of that dataset config."""
        return dataset if isinstance(dataset, EvaluatorData) else cls(dataset, protocol_class(dataset))

    @property
    def training_config(self) -> dict:
        """The data config the evaluator trains on (its cache key)."""
        return self.protocol.training_config(self.dataset_cfg)

    def items(self, cfg: dict, n: int):
        """The first ``n`` items of ``cfg``'s data: images, attributes and the protocol's nuisance targets."""
        dataset = DATASETS.build(cfg)
        idx = range(min(n, len(dataset)))
        x, y = stack_items(dataset, idx)
        targets = self.protocol.nuisance_targets(dataset, idx)
        nuis, mask = targets if targets is not None else (None, None)
        return x, y, nuis, mask


def training_config(dataset_cfg: dict) -> dict:
    """The data an evaluator for ``dataset_cfg`` learns from (its evaluation protocol's ``training_config``)."""
    return EvaluatorData.of(dataset_cfg).training_config


def config_hash(cfg: dict) -> str:
    """Return a short hash of a data config (the cache key of its evaluator)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def train_evaluator(dataset_cfg: "dict | EvaluatorData", *, steps: int = TRAIN_STEPS, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                    progress: bool = True) -> tuple[Evaluator, dict]:
    """Train an evaluator on the train split of ``dataset_cfg``; return it and its held-out scores."""
    data = EvaluatorData.of(dataset_cfg)
    x, y, nuis, mask = data.items(data.training_config, TRAIN_ITEMS)
    torch.manual_seed(seed)
    model = Evaluator(y.shape[1], 0 if nuis is None else nuis.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in trange(steps, desc="evaluator", disable=not progress):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        f = model.features(x[idx])
        loss = nn.functional.binary_cross_entropy_with_logits(model.attrs(f), y[idx])
        if nuis is not None:
            err = (model.nuisances(f) - nuis[idx]) ** 2 * mask[idx]
            loss = loss + 10 * err.sum() / mask[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, heldout_scores(model, data)


def heldout_scores(model: Evaluator, data: EvaluatorData, n: int = 1024) -> dict:
    """Score an evaluator on held-out real images: attribute accuracy and nuisance RMSE."""
    x, y, nuis, mask = data.items(data.protocol.scoring_config(data.dataset_cfg, n), n)
    out = model.predict(x)
    correct = ((out["probs"] > 0.5).float() == y).float()
    scores = {"heldout_accuracy": correct.mean().item(), "heldout_all_correct": correct.all(1).float().mean().item(), "n": len(x)}
    if nuis is not None:
        err = ((out["nuisances"] - nuis) ** 2 * mask).sum(0) / mask.sum(0)
        scores["heldout_nuisance_rmse"] = dict(zip(data.protocol.nuisance_columns, err.sqrt().tolist()))
    return scores


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an evaluator's tensors (names, dtypes, shapes and bytes, in name order): what identifies
    the weights, where ``dataset_hash`` identifies only the data they were trained on."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_evaluator(path: Path, model: Evaluator, dataset_cfg: "dict | EvaluatorData", attr_names: list[str],
                   scores: dict) -> None:
    """Write an evaluator as safetensors with its data config, hash, command and held-out scores in the metadata."""
    cfg = EvaluatorData.of(dataset_cfg).training_config
    meta = {"format": "gmmcond-evaluator-v1", "dataset": json.dumps(cfg, sort_keys=True), "dataset_hash": config_hash(cfg),
            "command": TRAIN_COMMAND, "attr_names": json.dumps(attr_names), "scores": json.dumps(scores),
            "weights_sha256": weights_sha256(model.state_dict()),
            "num_nuisances": str(0 if model.nuisances is None else model.nuisances.out_features)}
    write_safetensors(path, model.state_dict(), meta)


def load_evaluator(path: Path) -> tuple[Evaluator, dict]:
    """Read an evaluator file; return the model and its metadata (dataset, attr_names, scores decoded)."""
    path = Path(path)
    if not path.exists():
        raise EvaluatorError(f"evaluator not found: {path}")
    state, meta = read_safetensors(path, EvaluatorError)
    if meta.get("format") != "gmmcond-evaluator-v1":
        raise EvaluatorError(f"{path} is not a gmmcond evaluator (format {meta.get('format')!r})")
    for key in ("dataset", "attr_names", "scores"):
        meta[key] = json.loads(meta[key])
    actual = weights_sha256(state)
    if meta.get("weights_sha256", actual) != actual:
        raise EvaluatorError(f"{path}: its weights do not match the sha256 in its metadata ({meta['weights_sha256'][:16]}... "
                             f"recorded, {actual[:16]}... found); the file was altered: restore it or retrain it")
    meta["weights_sha256"] = actual
    model = Evaluator(len(meta["attr_names"]), int(meta["num_nuisances"]))
    model.load_state_dict(state)
    return model.eval(), meta


def cache_dir() -> Path:
    """Return the folder of evaluators trained on first use."""
    return cache_root() / "evaluators"


def evaluator_for(dataset_cfg: dict, path: str | Path | None = None, *, progress: bool = True) -> tuple[Evaluator, dict, Path]:
    """Return the evaluator for a run's data: ``path`` if given, the frozen one for the default shapes data,
    else one cached under the data config's hash (trained now if missing)."""
    data = EvaluatorData.of(dataset_cfg)
    cfg = data.training_config
    if path is None:
        frozen = load_evaluator(FROZEN)[1]["dataset"] if FROZEN.exists() else None
        if frozen == cfg:
            path = FROZEN
        else:
            path = cache_dir() / f"{cfg['type']}_{config_hash(cfg)}.safetensors"
            if not path.exists():
                differs = sorted(k for k in {*cfg, *(frozen or {})} if (frozen or {}).get(k) != cfg.get(k))
                print(f"gmmcond: no frozen evaluator for this data (it differs from the frozen one's in "
                      f"{', '.join(differs)}): training one now ({TRAIN_STEPS} steps, a few minutes on a CPU), "
                      f"cached at {path}; --evaluator PATH pins one", file=sys.stderr)
                model, scores = train_evaluator(data, progress=progress)
                names = list(DATASETS.build(cfg).attr_names)
                save_evaluator(path, model, data, names, scores)
    model, meta = load_evaluator(Path(path))
    return model, meta, Path(path)


def attribute_reader(dataset_cfg: dict, names: list[str], groups: list[list[str]]):
    """A function image[3, H, W] -> its attributes (0/1 over ``names``, one member per group) as the evaluator of
    ``dataset_cfg`` reads them; an evaluator of other attributes is a RunError that says to name them instead."""
    evaluator, meta, _ = evaluator_for(dataset_cfg)
    if list(meta["attr_names"]) != list(names):
        raise RunError(f"the evaluator of this run's data reads {meta['attr_names']}, not the run's attributes; "
                       f"give the image's attributes with --source-attrs")
    return lambda image: read_attributes(evaluator.predict(image[None])["probs"], names, groups)[0]
