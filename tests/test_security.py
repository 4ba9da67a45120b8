"""Nothing read from a run directory, a checkpoint or a dataset runs code: planted pickles are refused unrun."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmmcond.data.local import CIFAR10
from gmmcond.engine.trainer import train
from gmmcond.errors import CheckpointError, DatasetError
from gmmcond.io import load_checkpoint
from gmmcond.registry import DATASETS

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


class Payload:
    """Unpickling this calls a function: what a malicious shared file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoints" / "step_0000001.pt"
    path.parent.mkdir()
    torch.save({"step": 1, "model": {}, "evil": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="could run code; refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_sample_cli_refuses_a_planted_checkpoint_without_running_it(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    (run / "ema.safetensors").unlink()  # force the checkpoint path
    ckpt = run / "checkpoints" / "step_0000003.pt"
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "ran"
    state["evil"] = Payload(marker)
    torch.save(state, ckpt)
    proc = subprocess.run([PY, str(ROOT / "launch" / "sample.py"), "--run", str(run), "--n", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "could run code; refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_cifar_batch_that_would_run_code_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"], b"evil": Payload(marker)}, f)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": [], b"labels": [], b"evil": Payload(marker)}, f)
    with pytest.raises(DatasetError, match="refusing to load pathlib"):
        DATASETS.build({"type": "cifar10", "root": str(tmp_path)})
    with pytest.raises(DatasetError, match="refusing to load pathlib"):
        CIFAR10._load(folder / "batches.meta")
    assert not marker.exists()
