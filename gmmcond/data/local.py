"""Datasets on local files: CelebA, CIFAR-10 and a user's folder of images with a CSV of attributes.

Every dataset yields ``(image[3, H, W] in [-1, 1], attrs[K] float, index)`` and carries ``attr_names``
and ``groups`` (lists of mutually exclusive attributes). Nothing is downloaded: a missing or malformed
file is a :class:`DatasetError` naming the file and what to do.
"""
from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from . import shapes  # noqa: F401  (registers the embedded default)
from ..errors import DatasetError
from ..registry import DATASETS, EVAL_PROTOCOLS
from .protocol import TableProtocol
from .shapes import to_tensor


class AttributeTable(Dataset):
    """A dataset that holds every item's attribute row in the tensor ``attrs`` [N, K]."""

    attrs: torch.Tensor

    def attribute_rows(self) -> torch.Tensor:
        """Every item's attribute row [N, K] (no image is read)."""
        return self.attrs


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Crop the largest centred square and resize it to ``size`` x ``size``."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DECODE_AT_LOAD = 2000  # folders up to this size are decoded once when the dataset is built


def read_image(path: Path, size: int, where: str = "") -> torch.Tensor:
    """Decode an image file to a [3, size, size] tensor in [-1, 1]; a file that does not decode is a
    DatasetError naming it (and ``where`` it is listed), never a bare PIL traceback."""
    try:
        with Image.open(path) as image:
            return to_tensor(center_crop_resize(image.convert("RGB"), size))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        listed = f" (listed at {where})" if where else ""
        raise DatasetError(f"{path}{listed} does not decode as an image ({type(exc).__name__}: {exc}); "
                           f"replace the file or remove its row") from None


def require(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise a DatasetError saying what was expected there."""
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


@DATASETS.register("celeba")
class CelebA(AttributeTable):
    """CelebA in its official layout: ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``."""

    SPLITS = {"train": 0, "valid": 1, "test": 2}

    def __init__(
        self,
        *,
        root: str,  # Folder holding the three official entries.
        size: int = 64,  # Output side: centre crop, then resize.
        split: str = "train",  # train | valid | test | all
    ):
        root_path = Path(root).expanduser()
        hint = "download CelebA (Liu et al. 2015) by hand and point dataset.root at the folder"
        images = require(root_path / "img_align_celeba", f"CelebA image folder ({hint})")
        attr_file = require(root_path / "list_attr_celeba.txt", f"CelebA attribute list ({hint})")
        part_file = require(root_path / "list_eval_partition.txt", f"CelebA partition list ({hint})")
        if split not in (*self.SPLITS, "all"):
            raise DatasetError(f"dataset.split must be one of train, valid, test, all; got '{split}'")
        lines = attr_file.read_text().splitlines()
        try:
            count, names = int(lines[0]), lines[1].split()
            rows = [line.split() for line in lines[2 : 2 + count]]
            table = {r[0]: [int(v) for v in r[1:]] for r in rows}
        except (IndexError, ValueError) as exc:
            raise DatasetError(f"{attr_file}: malformed ({exc}); expected a count line, 40 names, then 'file -1/1 ...' rows") from exc
        if len(rows) != count or any(len(v) != len(names) for v in table.values()):
            raise DatasetError(f"{attr_file}: expected {count} rows of {len(names)} values each")
        partition = dict(line.split() for line in part_file.read_text().splitlines() if line.strip())
        keep = [f for f in table if split == "all" or int(partition.get(f, -1)) == self.SPLITS[split]]
        self.root, self.size, self.images = root_path, size, images
        self.files = sorted(keep)
        self.attrs = torch.tensor([table[f] for f in self.files], dtype=torch.float32).clamp(min=0)
        self.attr_names, self.groups = names, []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = require(self.images / self.files[index], "CelebA image")
        return read_image(path, self.size, "list_attr_celeba.txt"), self.attrs[index], index


class CIFARUnpickler(pickle.Unpickler):
    """Unpickle CIFAR-10 batches without running code: only numpy array reconstruction may be looked up.

    The official batches hold dicts, lists, bytes, ints and numpy arrays; any other global (``os.system``,
    ``builtins.eval`` ...) means the file is not an official batch, and it is refused before anything runs.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DatasetError(f"refusing to load {module}.{name} from a CIFAR-10 pickle: the official batches hold only "
                               f"dicts, lists, bytes, ints and numpy arrays, so this file is not one (it could run code)")
        return super().find_class(module, name)


@DATASETS.register("cifar10")
class CIFAR10(AttributeTable):
    """CIFAR-10 from the local ``cifar-10-batches-py`` pickles; attributes are the one-hot class."""

    def __init__(
        self,
        *,
        root: str,  # The cifar-10-batches-py folder (or its parent).
        split: str = "train",  # train (data_batch_1..5) | test (test_batch)
    ):
        folder = Path(root).expanduser()
        if (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
        hint = "unpack cifar-10-python.tar.gz (Krizhevsky 2009) and point dataset.root at cifar-10-batches-py"
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if split not in names:
            raise DatasetError(f"dataset.split must be 'train' or 'test', got '{split}'")
        data, labels = [], []
        for name in names[split]:
            batch = self._load(require(folder / name, f"CIFAR-10 batch ({hint})"))
            data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        meta = self._load(require(folder / "batches.meta", f"CIFAR-10 metadata ({hint})"))
        self.attr_names = [n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"]]
        self.groups = [list(self.attr_names)]
        self.size = 32
        self.data = torch.from_numpy(np.concatenate(data))
        self.labels = torch.tensor(labels)
        self.attrs = torch.nn.functional.one_hot(self.labels, len(self.attr_names)).float()

    @staticmethod
    def _load(path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                return CIFARUnpickler(f, encoding="bytes").load()
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"{path}: not a CIFAR-10 pickle ({exc})") from exc

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.data[index].float() / 127.5 - 1, self.attrs[index], index


def held_out(name: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out split: a hash of its name, so the split is the same everywhere."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return digest < fraction * 16 ** 8


@DATASETS.register("imagefolder_attrs")
class ImageFolderAttrs(AttributeTable):
    """A folder of images and a CSV: first column the file name, one column of 0/1 (or -1/1) per attribute.

    The held-out split (``split="test"``) is the CSV's ``split`` column where it has one (values train/test),
    else a fixed ``holdout`` fraction chosen by a hash of each file name, the same on every machine.
    """

    def __init__(
        self,
        *,
        root: str,  # Folder of images.
        csv_file: str = "attrs.csv",  # CSV path, relative to root unless absolute.
        size: int = 64,  # Output side: centre crop, then resize.
        groups: list | None = None,  # Optional lists of mutually exclusive attribute names.
        split: str = "train",  # train | test | all: the CSV's split column, else a fixed name-hashed held-out split.
        holdout: float = 0.1,  # Fraction of files in the test split where the CSV has no split column.
    ):
        root_path = Path(root).expanduser()
        csv_path = require(root_path / csv_file, "attribute CSV (first column file name, then 0/1 columns)")
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) < 2 or len(rows[0]) < 2:
            raise DatasetError(f"{csv_path}: needs a header (file, attr1, ...) and at least one row")
        header = [name.strip() for name in rows[0]]
        split_col = header.index("split") if "split" in header[1:] else None
        attr_cols = [k for k in range(1, len(header)) if k != split_col]
        self.attr_names = [header[k] for k in attr_cols]
        files, values, tags, lines = [], [], [], []
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != len(rows[0]):
                raise DatasetError(f"{csv_path}:{line}: {len(row)} columns, header has {len(rows[0])}")
            if split_col is not None:
                tags.append(row[split_col].strip())
                if tags[-1] not in ("train", "test"):
                    raise DatasetError(f"{csv_path}:{line}: the split column must say train or test, got '{tags[-1]}'")
            row = [row[0]] + [row[k] for k in attr_cols]
            try:
                vals = [int(float(v)) for v in row[1:]]
            except ValueError as exc:
                raise DatasetError(f"{csv_path}:{line}: attribute values must be 0/1 or -1/1 ({exc})") from exc
            if any(v not in (-1, 0, 1) for v in vals):
                raise DatasetError(f"{csv_path}:{line}: attribute values must be 0/1 or -1/1, got {row[1:]}")
            files.append(row[0].strip())
            values.append(vals)
            lines.append(line)
        for group in groups or []:
            for name in group:
                if name not in self.attr_names:
                    raise DatasetError(f"dataset.groups names '{name}', which is not a CSV column: {self.attr_names}")
        if split not in ("train", "test", "all"):
            raise DatasetError(f"dataset.split must be train, test or all, got '{split}'")
        if not 0 <= holdout < 1:
            raise DatasetError(f"dataset.holdout must be in [0, 1), got {holdout}")
        if split != "all":
            test = [t == "test" for t in tags] if tags else [held_out(f, holdout) for f in files]
            picked = [i for i, t in enumerate(test) if t == (split == "test")]
            files, values, lines = [files[i] for i in picked], [values[i] for i in picked], [lines[i] for i in picked]
            if not files:
                raise DatasetError(f"{csv_path}: the '{split}' split (dataset.holdout={holdout}) holds no images")
        missing = [f for f in files if not (root_path / f).exists()]
        if missing and not any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            raise DatasetError(f"{csv_path}: the first column ('{header[0]}') must hold the image file names, e.g. "
                               f"img_001.png; it holds {', '.join(repr(f) for f in files[:3])}, ...")
        if missing:
            raise DatasetError(f"{csv_path}: {len(missing)} listed images are missing from {root_path}, e.g. {missing[0]}")
        self.root, self.size, self.files, self.groups = root_path, size, files, [list(g) for g in groups or []]
        self.where = [f"{csv_path}:{line}" for line in lines]
        self.attrs = torch.tensor(values, dtype=torch.float32).clamp(min=0)
        # Small folders are decoded once here, so a bad file is found before training starts, not at step 3.
        self.cache = ([read_image(root_path / f, size, w) for f, w in zip(files, self.where)]
                      if len(files) <= DECODE_AT_LOAD else None)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        if self.cache is not None:
            return self.cache[index], self.attrs[index], index
        return read_image(self.root / self.files[index], self.size, self.where[index]), self.attrs[index], index


for _kind in ("celeba", "cifar10", "imagefolder_attrs"):  # each holds its attribute rows as the tensor .attrs
    EVAL_PROTOCOLS.register(_kind, TableProtocol)
