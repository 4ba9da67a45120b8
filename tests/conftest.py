import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_cfg():
    """A resolved tiny config (seconds per run)."""
    from gmmcond.config import load_config

    def make(*overrides):
        return load_config("shapes_tiny", overrides)

    return make


@pytest.fixture
def tiny_run(tiny_cfg, tmp_path):
    """A trained tiny run (three steps) at tmp_path/runs/tiny."""
    from gmmcond.engine.trainer import train

    run = tmp_path / "runs" / "tiny"
    train(tiny_cfg(), run)
    return run
