"""Datasets (the embedded shapes, CelebA, CIFAR-10, a folder of images) and attribute requests by name."""
from . import local, shapes  # noqa: F401  (fill DATASETS)
from .attrs import AttrRequest, describe, parse_attrs, parse_compose, parse_expr  # noqa: F401
from .shapes import ShapesDataset  # noqa: F401
