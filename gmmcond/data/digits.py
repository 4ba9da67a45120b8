"""A real dataset that needs no download: handwritten digits written as an ``imagefolder_attrs`` folder.

The UCI "Optical Recognition of Handwritten Digits" test images (Alpaydin and Kaynak 1998: 1,797 scans of digits
written by 43 people, 8x8 blocks of 17 grey levels) ship inside scikit-learn (``sklearn.datasets.load_digits``
reads them from the installed package). :func:`write_digits` writes them once as PNGs and an attribute CSV in the
layout ``imagefolder_attrs`` reads, and the ``digits`` dataset reads that folder through ``imagefolder_attrs``
itself, so a recipe trained on it goes the way a user's own folder of images goes: the same reader, held-out
split, evaluator trained on first use and scoring.

Attributes: the digit (``zero`` ... ``nine``, one group: exactly one per image) and ``heavy`` (more ink than the
median image of the same digit: the stroke weight, a property of the real scans, balanced inside every digit), so
a request can name two things and leave one open. A fixed 30% of each digit is held out (the CSV's ``split``
column), enough for an evaluation at ``--n 256`` (its real reference takes another 256 held-out images).
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError
from ..registry import DATASETS, EVAL_PROTOCOLS
from ..utils import cache_root
from .local import ImageFolderAttrs
from .protocol import TableProtocol

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTR_NAMES = (*DIGIT_NAMES, "heavy")
TEST_FRACTION = 0.3  # of each digit, the same images everywhere (a fixed seed)
SPLIT_SEED = 0
CSV_NAME = "attrs.csv"


def default_root() -> Path:
    """Where the folder is written unless a recipe names one: beside the cached evaluators."""
    return cache_root() / "data" / "digits"


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans as their grey levels [N, 8, 8] (integers 0..16, ink high) and their digits [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the digits dataset reads the UCI digits that ship inside scikit-learn, which is not "
                           "installed: pip install scikit-learn (it comes with gmmcond[test])") from None
    data = load_digits()
    return data.images.astype(np.int64), data.target.astype(np.int64)


def digit_rows(grey: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attribute rows [N, 11] (the digit one-hot, then ``heavy``) and the held-out flags [N]: for each digit,
    ``heavy`` marks the scans with more ink (summed grey levels) than the digit's median scan, and a seeded draw
    of ``TEST_FRACTION`` of its scans (rounded) is held out."""
    ink = grey.reshape(len(grey), -1).sum(1)
    rows = np.zeros((len(grey), len(ATTR_NAMES)), np.int64)
    rows[np.arange(len(grey)), digits] = 1
    test = np.zeros(len(grey), bool)
    rng = np.random.default_rng(SPLIT_SEED)
    for d in range(len(DIGIT_NAMES)):
        members = np.flatnonzero(digits == d)
        rows[members, -1] = ink[members] > np.median(ink[members])
        test[rng.permutation(members)[: round(TEST_FRACTION * len(members))]] = True
    return rows, test


def write_digits(root: str | Path | None = None) -> Path:
    """Write the digits as an ``imagefolder_attrs`` folder at ``root`` (default :func:`default_root`) unless one
    is there: ``NNNN.png`` (8x8 grey) and ``attrs.csv`` (file, the 11 attributes, split). Written beside the
    target and renamed into place, so a folder that exists is whole (two processes may race; one wins)."""
    root = Path(root).expanduser() if root is not None else default_root()
    if (root / CSV_NAME).exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists without {CSV_NAME}: it is not a digits folder written by gmmcond; "
                           f"remove it or give dataset.root another folder")
    grey, digits = load_scans()
    rows, test = digit_rows(grey, digits)
    images = np.rint(grey * (255 / 16)).astype(np.uint8)  # the 17 levels spread over 0..255
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / CSV_NAME, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", *ATTR_NAMES, "split"])
        for i, (image, row, held) in enumerate(zip(images, rows, test)):
            Image.fromarray(image).save(tmp / f"{i:04d}.png")
            out.writerow([f"{i:04d}.png", *row.tolist(), "test" if held else "train"])
    try:
        if root.exists():
            root.rmdir()  # empty (checked above); a rename cannot replace a folder
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / CSV_NAME).exists():  # not another process's finished copy
            raise
    return root


@DATASETS.register("digits")
class Digits(ImageFolderAttrs):
    """Real handwritten digits (the UCI scans inside scikit-learn), written once by :func:`write_digits` and read
    through ``imagefolder_attrs``: ten digit attributes in one group and ``heavy``; 30% of each digit held out."""

    def __init__(
        self,
        *,
        root: str | None = None,  # Folder to write (once) and read; default $GMMCOND_CACHE/data/digits.
        size: int = 16,  # Output side: the 8x8 scans resized (bicubic).
        split: str = "train",  # train | test | all (the CSV's split column).
    ):
        super().__init__(root=str(write_digits(root)), csv_file=CSV_NAME, size=size, groups=[list(DIGIT_NAMES)],
                         split=split)


EVAL_PROTOCOLS.register("digits", TableProtocol)
