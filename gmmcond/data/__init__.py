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


SIGMA_DATA_ITEMS = 4096  # at most this many items, evenly spaced over the dataset, measure its sigma_data


def measure_sigma_data(dataset, max_items: int = SIGMA_DATA_ITEMS) -> float:
    """The standard deviation of a dataset's images (every pixel of up to ``max_items`` items, evenly spaced, in
    float64), rounded to two decimals: what ``denoiser.sigma_data: data`` becomes. k-diffusion's preconditioning
    takes ``sigma_data`` to be this number (Karras et al. 2022, Sec. 5); its MNIST config measures it (0.6162)."""
    import torch

    n = len(dataset)
    if n == 0:
        raise ValueError("cannot measure sigma_data on an empty dataset")
    count, total, squares = 0, 0.0, 0.0
    for i in torch.linspace(0, n - 1, min(n, max_items)).round().long().unique().tolist():
        image = dataset[i][0].double()
        count, total, squares = count + image.numel(), total + image.sum().item(), squares + image.square().sum().item()
    mean = total / count
    return round(((squares - count * mean * mean) / (count - 1)) ** 0.5, 2)
