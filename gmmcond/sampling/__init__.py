"""Samplers (x0_reproject and k-diffusion's), guidance wrappers, generation and the exact GMM testbed."""
from .generate import generate  # noqa: F401
from .guidance import CFGDenoiser, ComposedGuidanceDenoiser, HeadGuidedDenoiser  # noqa: F401
from .samplers import sample, sample_x0_reproject  # noqa: F401
