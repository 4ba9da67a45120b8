"""Datasets (the embedded shapes, handwritten digits, CelebA, CIFAR-10, a folder of images) and attribute requests
by name."""
from . import digits, local, shapes  # noqa: F401  (fill DATASETS)
from .attrs import AttrRequest, describe, parse_attrs, parse_compose, parse_expr  # noqa: F401
from .shapes import ShapesDataset  # noqa: F401


def upgrade_dataset_config(node: dict) -> dict:
    """Return a run's recorded dataset node with the keys it predates filled in as that run was trained
    (shapes runs from before ``variation`` drew the near-fixed geometry, ``variation: 0``)."""
    legacy = {"shapes": shapes.LEGACY_DEFAULTS}.get(node.get("type"), {})
    return {**legacy, **node}
