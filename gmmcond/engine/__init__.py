"""Training and trained runs: the trainer, precision/compile, loading run directories."""
from .runs import LoadedRun, export_run, load_run  # noqa: F401
from .sheets import Samples, sample_requests  # noqa: F401
from .trainer import Trainer, train  # noqa: F401
