"""gmmcond: GMM attribute conditioning, NGMG and x0-reprojection sampling for k-diffusion.

Reference implementation of Lu et al., "Diffusion Model Conditioning on Gaussian Mixture Model and
Negative Gaussian Mixture Gradient" (arXiv 2401.11261). Importing the package fills every registry.
"""
from . import conditioners, datasets, heads, models, sampling, schedules  # noqa: F401
from .config import ConfigError, load_config  # noqa: F401
from .registry import CONDITIONERS, DATASETS, HEADS, LOSSES, MODELS, SAMPLERS, SCHEDULES, Registry  # noqa: F401

__version__ = "0.1.0"
