"""Nothing is lost: one training per run directory, the last good checkpoint named after a NaN, resume that
continues exactly and records what changed, Ctrl-C that checkpoints."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from entry import PY, ROOT, assert_one_line, run_entry
from gmmcond.config import load_config
from gmmcond.engine.trainer import LossWatch, train
from gmmcond.errors import CheckpointError, RunError, TrainingDiverged
from gmmcond.io import RunLock, load_checkpoint, read_metrics
from gmmcond.modeling.runs import load_run


def test_a_truncated_checkpoint_on_resume_is_one_line(tiny_run):
    latest = tiny_run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tiny_run.parent, "--name", "tiny",
                          "train.steps=4", "--resume")
    assert_one_line(code, err, "step_0000003.pt is corrupt or truncated")


def test_a_second_training_into_a_held_run_is_refused(tiny_cfg, tmp_path):
    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    parent = os.getppid()  # a live process that is not this one
    (run / RunLock.NAME).write_text(json.dumps({"pid": parent, "host": os.uname().nodename, "started": "now"}))
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tmp_path / "runs", "--name", "held")
    assert_one_line(code, err, f"is being trained by process {parent} on {os.uname().nodename} since now")
    assert not (run / "metrics.jsonl").exists()  # nothing was written into the held run


def test_a_stale_lock_from_a_dead_process_is_taken_over_and_released(tiny_cfg, tmp_path, capsys):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / RunLock.NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    train(tiny_cfg(), run)
    assert f"took over {run / RunLock.NAME}, left by process {dead.pid}" in capsys.readouterr().out
    assert not (run / RunLock.NAME).exists()


def test_the_lock_is_released_when_training_fails(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    with pytest.raises(RunError, match="pass --resume"):
        train(tiny_cfg(), run)
    assert not (run / RunLock.NAME).exists()


def test_two_lock_holders_exclude_each_other(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunError, match=f"is being trained by process {os.getpid()}"):
        second.acquire()
    second.release()  # not the holder: leaves the lock alone
    assert (tmp_path / RunLock.NAME).exists()
    first.release()
    assert not (tmp_path / RunLock.NAME).exists()


def test_loss_watch_marks_the_checkpoints_before_an_explosion():
    watch = LossWatch()
    for step in range(1, 9):
        watch.checkpointed(step - 1) if step > 1 else None
        loss = 1.0 if step < 5 else 1e6 if step < 8 else float("nan")
        watch.update(step, loss)
    assert watch.good() == [1, 2, 3]  # checkpoint 4's weights gave the first exploding loss (step 5)
    sudden = LossWatch()
    sudden.checkpointed(2)
    sudden.update(1, 1.0), sudden.update(2, 1.0), sudden.update(3, float("nan"), weights_finite=True)
    assert sudden.good() == [2]  # a NaN out of a healthy stretch, weights finite: the checkpoint before is fine


def test_nan_after_an_explosion_names_a_checkpoint_from_before_it(tiny_cfg, tmp_path, monkeypatch):
    from gmmcond.modeling.objective import TrainingObjective

    real = TrainingObjective.forward
    calls = {"n": 0}

    def exploding(self, *args):
        calls["n"] += 1
        out = real(self, *args)
        scale = 1.0 if calls["n"] < 5 else 1e8 if calls["n"] < 7 else float("nan")
        return {k: v * scale for k, v in out.items()}

    monkeypatch.setattr(TrainingObjective, "forward", exploding)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7; .*last good checkpoint .* is .*step_0000003.pt"):
        train(tiny_cfg("train.steps=10", "train.checkpoint_every=1"), run)
    kept = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert "step_0000003.pt" in kept and kept[-1] == "step_0000006.pt"  # the good one survived pruning (keep 2)


def test_resume_applies_a_changed_lr_and_records_it(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("train.steps=4", "train.warmup_steps=1", "train.lr_decay=constant"), run)
    train(tiny_cfg("train.steps=6", "train.warmup_steps=1", "train.lr_decay=constant", "train.lr=2.5e-4"), run, resume=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics if m["step"] > 4] == [2.5e-4, 2.5e-4]
    history = load_run(run).cfg["history"]
    assert history == [{"step": 4, "changed": {"train.steps": {"from": 4, "to": 6},
                                                "train.lr": {"from": 0.001, "to": 2.5e-4}}}]
    assert load_checkpoint(run / "checkpoints" / "step_0000006.pt")["opt"]["param_groups"][0]["initial_lr"] == 2.5e-4


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=16", "cannot change train.batch_size (8 -> 16): the data order is a function of"),
    ("train.seed=5", "cannot change train.seed (0 -> 5)"),
    ("train.steps=2", "train.steps=2 is before the checkpoint's step 3"),
])
def test_resume_refuses_what_it_cannot_apply_and_config_yaml_keeps_the_truth(tiny_run, override, fragment):
    before = (tiny_run / "config.yaml").read_text()
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tiny_run.parent, "--name", "tiny", override,
                          "--resume")
    assert_one_line(code, err, fragment)
    assert (tiny_run / "config.yaml").read_text() == before


def test_a_truncated_export_falls_back_to_the_checkpoint(tiny_run, capsys):
    export = tiny_run / "ema.safetensors"
    export.write_bytes(export.read_bytes()[:100])
    loaded = load_run(tiny_run)
    assert loaded.source.name == "step_0000003.pt" and loaded.step == 3
    assert f"note: {export} is unreadable (truncated or corrupt); using the EMA weights of" in capsys.readouterr().err


def test_sigint_checkpoints_names_the_resume_command_and_resumes_exactly(tmp_path):
    """Ctrl-C in a real process: one line, exit 2, a checkpoint of the finished step; --resume then logs the
    losses of an uninterrupted run, and the final weights are bit-identical."""
    args = ["--config", "shapes_tiny", "--runs", str(tmp_path), "train.steps=60", "train.checkpoint_every=1000",
            "train.log_every=1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, str(ROOT / "launch" / "train.py"), *args, "--name", "cut"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    line = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "Interrupted: interrupted after step" in line[0], err[-2000:]
    assert line[0].endswith("--name cut --resume") and "python " in line[0]
    cut_at = int(line[0].split("after step ")[1].split()[0])
    assert 20 <= cut_at < 60 and (tmp_path / "cut" / "checkpoints" / f"step_{cut_at:07d}.pt").exists()
    train(load_config("shapes_tiny", args[4:]), tmp_path / "cut", resume=True)
    cfg = load_config("shapes_tiny", args[4:])
    cfg["name"] = "full"
    train(cfg, tmp_path / "full")
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")}
                            for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert timeless(tmp_path / "cut") == timeless(tmp_path / "full")
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000060.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000060.pt")
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=6", "train.checkpoint_every=2", "conditioner.cond_dropout=0.5")
    train(cfg, tmp_path / "full")

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # dies after step 5 ran, with the last checkpoint at step 4

    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", on_step=kill_at_5)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_0000004.pt"
    train(cfg, tmp_path / "cut", resume=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000006.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000006.pt")
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, cut[key][name]), (key, name)
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")} for m in read_metrics(run / "metrics.jsonl")]
    assert timeless(tmp_path / "cut") == timeless(tmp_path / "full")  # same loss at the same step


def test_corrupt_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    latest = run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_0000003.pt is corrupt or truncated .*earlier one \(\['step_0000002.pt'\]\)"):
        train(tiny_cfg("train.steps=4"), run, resume=True)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_run(run, checkpoint=latest)
    assert load_run(run).source.name == "ema.safetensors"  # sampling needs only the export, which is intact


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    from gmmcond.modeling.schedules import KarrasSchedule

    real = KarrasSchedule.sample_sigmas
    calls = {"n": 0}

    def poisoned(self, n, generator=None):
        calls["n"] += 1
        sigmas = real(self, n, generator)
        return sigmas * float("nan") if calls["n"] == 3 else sigmas

    monkeypatch.setattr(KarrasSchedule, "sample_sigmas", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3; .* the last good checkpoint \(taken before the loss left its range\) is .*step_0000002.pt"):
        train(tiny_cfg(), run)
    state = load_checkpoint(run / "checkpoints" / "step_0000002.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_with_a_different_model_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "run")
    with pytest.raises(RunError, match=r"trained with different model settings; resume with the run's own config"):
        train(tiny_cfg("train.steps=5", "model.channels=[8,32]"), tmp_path / "run", resume=True)


def test_resume_previous_after_a_corrupt_latest_checkpoint(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)  # checkpoints at steps 2 and 3
    latest = run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"--resume-from PATH"):
        train(tiny_cfg("train.steps=4"), run, resume=True)
    last = train(tiny_cfg("train.steps=4"), run, resume="previous")
    assert last["step"] == 4
    assert load_run(run).step == 4


def test_a_checkpoint_from_before_a_new_setting_resumes(tiny_cfg, tmp_path):
    """A checkpoint whose config lacks settings added later (model.has_variance, train.adamw_impl) resumes: they
    take their defaults, as when the run is loaded; a real model change is still refused (test above)."""
    from gmmcond.io import save_checkpoint

    run = tmp_path / "run"
    train(tiny_cfg("train.steps=2"), run)
    path = run / "checkpoints" / "step_0000002.pt"
    state = load_checkpoint(path)
    del state["config"]["model"]["has_variance"], state["config"]["train"]["adamw_impl"]
    path.unlink()
    save_checkpoint(run, 2, state)
    train(tiny_cfg("train.steps=3", "train.adamw_impl=fused"), run, resume=True)
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    # a new train setting counts at its default in the old run, so setting it at resume is a recorded change
    history = load_checkpoint(run / "checkpoints" / "step_0000003.pt")["config"]["history"]
    assert history == [{"step": 2, "changed": {"train.adamw_impl": {"from": "foreach", "to": "fused"},
                                               "train.steps": {"from": 2, "to": 3}}}]


class Killed(Exception):
    pass
