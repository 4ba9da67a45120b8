"""Trackers through accelerate: a tensorboard event file with the logged metrics and the sample grid."""
import json

import pytest

from gmmcond.engine.trackers import flat_config, tracker_names
from gmmcond.engine.trainer import train
from gmmcond.errors import ConfigError


def test_a_three_step_run_writes_tensorboard_events_with_the_metrics_and_the_grid(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install 'gmmcond[tensorboard]'; CI installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_cfg("train.log_with=tensorboard", "train.log_every=1"), run)
    events = sorted((run / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file under RUN/trackers"
    scalars, images = {}, {}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["images"]:
            images[tag] = [e.step for e in acc.Images(tag)]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    assert images["samples/grid"] == [3]


def test_no_tracker_unless_configured(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "run")
    assert not (tmp_path / "run" / "trackers").exists()


def test_an_unknown_or_uninstalled_tracker_is_a_clear_error(monkeypatch):
    assert tracker_names(None) == [] and tracker_names("none") == []
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        tracker_names("tensorbord")
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match=r"'wandb' tracker's package is not installed; pip install wandb"):
        tracker_names(["wandb"])
    with pytest.raises(ConfigError, match=r"gmmcond\[tensorboard\]"):
        tracker_names("tensorboard")


def test_flat_config_gives_tracker_scalars():
    flat = flat_config({"train": {"lr": 0.002, "betas": [0.9, 0.99]}, "name": "x", "head": {"type": "none", "w": None}})
    assert flat == {"train.lr": 0.002, "train.betas": "[0.9, 0.99]", "name": "x", "head.type": "none", "head.w": "null"}
