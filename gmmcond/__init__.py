"""gmmcond: GMM attribute conditioning, NGMG and x0-reprojection sampling for k-diffusion.

Reference implementation of Lu et al., "Diffusion Model Conditioning on Gaussian Mixture Model and
Negative Gaussian Mixture Gradient" (arXiv 2401.11261). Importing the package fills every registry.

Layers, each importing only those above it in this list: ``errors``/``registry``/``config``/``io``
(plumbing), ``math`` (the paper's formulas), ``data``, ``modeling`` (conditioners, models, heads, schedules, the
training objective, precision, loading run directories), ``sampling`` (samplers, guidance, the sampling settings,
generation, sample sheets), ``engine`` (the training loop), ``eval`` and ``experiments``.
"""
import warnings

# k-diffusion imports clip, which imports pkg_resources and warns about it on every command: silence
# exactly that warning, nothing else.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated as an API", category=UserWarning)

from . import data, modeling, sampling  # noqa: E402,F401  (fill every registry)
from .config import load_config  # noqa: E402,F401
from .data import describe, parse_attrs, parse_expr  # noqa: E402,F401
from .engine import train  # noqa: E402,F401
from .modeling.runs import LoadedRun, load_run  # noqa: E402,F401
from .errors import (AttributeSpecError, CheckpointError, ConfigError, DatasetError, GmmcondError,  # noqa: E402,F401
                     PrecisionError, RegistryError, RunError, TrainingDiverged)
from .modeling import BottleneckAttrs, Components, GMMAttrs, build  # noqa: E402,F401
from .registry import CONDITIONERS, DATASETS, HEADS, LOSSES, MODELS, SAMPLERS, SCHEDULES, Registry  # noqa: E402,F401
from .sampling import CFGDenoiser, HeadGuidedDenoiser, generate, sample, sample_x0_reproject  # noqa: E402,F401
from .sampling.settings import SamplingSettings  # noqa: E402,F401
from .sampling.sheets import Samples, sample_requests  # noqa: E402,F401

__version__ = "0.1.0"
