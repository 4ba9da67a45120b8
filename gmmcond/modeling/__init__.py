"""Components a config builds: conditioners, k-diffusion models, heads, noise schedules."""
from . import conditioners, heads, models, schedules  # noqa: F401  (fill the registries)
from .build import Components, build  # noqa: F401
from .conditioners import GMMAttrs  # noqa: F401
from .heads import BottleneckAttrs  # noqa: F401
