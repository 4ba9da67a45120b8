"""The bad-input battery: every user mistake is one line naming the thing and the fix, exit 2, no traceback,
and nothing is lost (run lock, last good checkpoint, resume overrides, SIGINT).

Entry points run in-process through ``runpy`` where that is enough (the interpreter and k-diffusion are
already loaded, so a case costs milliseconds); SIGINT and ``accelerate launch`` run as real processes.
"""
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from gmmcond.config import load_config
from gmmcond.modeling.runs import load_run
from gmmcond.engine.trainer import LossWatch, train
from gmmcond.errors import RunError, TrainingDiverged
from gmmcond.io import RunLock, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
from gmmcond.cli import fail_cleanly
from gmmcond.errors import CheckpointError, ConfigError, GmmcondError


def run_entry(script: str, *args, capsys, stdout: bool = False) -> tuple[int, str]:
    """Run launch/SCRIPT.py in this process as ``python launch/SCRIPT.py ARGS``; return (exit code, stderr), or
    (exit code, stdout and stderr) with ``stdout``."""
    old = sys.argv
    sys.argv = [str(ROOT / "launch" / f"{script}.py"), *map(str, args)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, (captured.out + captured.err) if stdout else captured.err


def assert_one_line(code: int, err: str, fragment: str) -> None:
    """Exit 2, no traceback, and exactly one error line, which holds ``fragment``."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and fragment in errors[0], err


@pytest.fixture
def tiny_run(tiny_cfg, tmp_path):
    run = tmp_path / "runs" / "tiny"
    train(tiny_cfg(), run)
    return run


BAD_YAML = "name: x\ntrain:\n  steps: 3\n   lr: 1\n"


@pytest.mark.parametrize("args, fragment", [
    (["train.stpes=3"], "train.stpes: unknown key; did you mean 'steps'?"),
    (["conditioner=gmm_atrs"], "conditioner.type: CONDITIONERS has no key 'gmm_atrs'; did you mean 'gmm_attrs'?"),
    (["train.lr=fast"], "train.lr: expected float, got 'fast'"),
    (["train.steps"], "override 'train.steps' must look like dotted.path=value"),
    (["train.steps=[1,"], "override 'train.steps=[1,':1:4: not valid YAML"),
    (["--config", "shapes_tinyy"], "no recipe 'shapes_tinyy'"),
    (["--config", "{bad}"], ":4:6: not valid YAML: mapping values are not allowed here"),
    (["--name", "nothing_here", "--resume"], "holds no checkpoint to resume (runs with checkpoints in"),
])
def test_train_config_mistakes_are_one_line(args, fragment, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    args = [str(bad) if a == "{bad}" else a for a in args]
    if "--config" not in args:
        args = ["--config", "shapes_tiny", *args]
    code, err = run_entry("train", *args, "--runs", tmp_path / "runs", capsys=capsys)
    assert_one_line(code, err, fragment)
    if str(bad) in args:
        assert err.startswith(f"error: ConfigError: {bad}:4:6: not valid YAML") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["1e-4", "3E-4", "1e6", "1.0e-4", "2e-3"])
def test_yaml_floats_in_scientific_notation_are_floats(text, tmp_path):
    assert load_config("shapes_tiny", [f"train.lr={text}"])["train"]["lr"] == float(text)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((ROOT / "registry" / "shapes_tiny.yaml").read_text().replace("  batch_size: 8", f"  batch_size: 8\n  lr: {text}"))
    cfg = load_config(recipe)
    assert cfg["train"]["lr"] == float(text) and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["steps"] == 3 and isinstance(cfg["train"]["steps"], int)  # ints stay ints


def test_a_truncated_checkpoint_on_resume_is_one_line(tiny_run, capsys):
    latest = tiny_run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tiny_run.parent, "--name", "tiny",
                          "train.steps=4", "--resume", capsys=capsys)
    assert_one_line(code, err, "step_0000003.pt is corrupt or truncated")


def test_a_second_training_into_a_held_run_is_refused(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    parent = os.getppid()  # a live process that is not this one
    (run / RunLock.NAME).write_text(json.dumps({"pid": parent, "host": os.uname().nodename, "started": "now"}))
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tmp_path / "runs", "--name", "held", capsys=capsys)
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
def test_resume_refuses_what_it_cannot_apply_and_config_yaml_keeps_the_truth(tiny_run, override, fragment, capsys):
    before = (tiny_run / "config.yaml").read_text()
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tiny_run.parent, "--name", "tiny", override,
                          "--resume", capsys=capsys)
    assert_one_line(code, err, fragment)
    assert (tiny_run / "config.yaml").read_text() == before


def write_folder(root: Path, n: int = 12, header: str = "file,cat,dog") -> None:
    rows = [header]
    for i in range(n):
        Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / f"img_{i:03d}.png")
        rows.append(f"img_{i:03d}.png,{i % 2},{1 - i % 2}")
    (root / "attrs.csv").write_text("\n".join(rows) + "\n")


def test_an_image_that_does_not_decode_is_named_with_its_csv_row(tmp_path, capsys):
    write_folder(tmp_path)
    data = (tmp_path / "img_005.png").read_bytes()
    (tmp_path / "img_005.png").write_bytes(data[: len(data) // 2])
    recipe = tmp_path / "folder.yaml"
    recipe.write_text((ROOT / "registry" / "shapes_tiny.yaml").read_text().replace(
        "  type: shapes\n  size: 16\n  length: 256", f"  type: imagefolder_attrs\n  root: {tmp_path}\n  size: 16\n  holdout: 0"))
    code, err = run_entry("train", "--config", recipe, "--runs", tmp_path / "runs", "sample.grid_rows=[cat]",
                          capsys=capsys)
    assert_one_line(code, err, f"{tmp_path / 'img_005.png'} (listed at {tmp_path / 'attrs.csv'}:7) does not decode")


def test_a_csv_whose_first_column_is_not_file_names_says_so(tmp_path):
    from gmmcond.errors import DatasetError
    from gmmcond.registry import DATASETS

    (tmp_path / "attrs.csv").write_text("id,cat,dog\n0,1,0\n1,0,1\n")
    with pytest.raises(DatasetError, match=r"the first column \('id'\) must hold the image file names"):
        DATASETS.build({"type": "imagefolder_attrs", "root": str(tmp_path), "holdout": 0})


@pytest.mark.parametrize("args, fragment", [
    (["--cfg-scale", "-1"], "argument --cfg-scale: must be >= 0"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: must be >= 0"),
    (["--attrs", "circle,purple"], "unknown attribute(s) ['purple']"),
])
def test_sample_mistakes_are_one_line(tiny_run, args, fragment, capsys):
    code, err = run_entry("sample", "--run", tiny_run, *args, "--n", 2, "--steps", 2, capsys=capsys)
    assert code == 2 and fragment in err and "Traceback" not in err, err


def test_a_truncated_export_falls_back_to_the_checkpoint(tiny_run, capsys):
    export = tiny_run / "ema.safetensors"
    export.write_bytes(export.read_bytes()[:100])
    loaded = load_run(tiny_run)
    assert loaded.source.name == "step_0000003.pt" and loaded.step == 3
    assert f"note: {export} is unreadable (truncated or corrupt); using the EMA weights of" in capsys.readouterr().err


def test_evaluation_at_small_n_warns(tiny_run):
    from gmmcond.eval.evaluate import EvalSize, evaluate_run

    result = evaluate_run(tiny_run, None, EvalSize(n=8, sets=0), progress=False, write=False)
    assert result["warnings"] and "n=8 is below 64" in result["warnings"][0]


def test_sigint_checkpoints_names_the_resume_command_and_resumes_exactly(tmp_path):
    """Ctrl-C in a real process: one line, exit 2, a checkpoint of the finished step; --resume then logs the
    losses of an uninterrupted run, and the final weights are bit-identical."""
    args = ["--config", "shapes_tiny", "--runs", str(tmp_path), "train.steps=300", "train.checkpoint_every=1000",
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
    assert 20 <= cut_at < 300 and (tmp_path / "cut" / "checkpoints" / f"step_{cut_at:07d}.pt").exists()
    train(load_config("shapes_tiny", args[4:]), tmp_path / "cut", resume=True)
    cfg = load_config("shapes_tiny", args[4:])
    cfg["name"] = "full"
    train(cfg, tmp_path / "full")
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")}
                            for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert timeless(tmp_path / "cut") == timeless(tmp_path / "full")
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000300.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000300.pt")
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())


def test_under_accelerate_launch_quiet_the_only_error_output_is_gmmconds_line(tmp_path):
    """``accelerate launch --quiet``: gmmcond's one line is the only error output. accelerate itself turns
    the child's exit status 2 into its own 1 (commands/launch.py, simple_launcher), which gmmcond cannot
    change from inside the child."""
    accelerate = Path(PY).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "launch" / "train.py"), "--config", "shapes_tiny", "--runs", str(tmp_path), "train.stpes=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["error: ConfigError: train.stpes: unknown key; did you mean 'steps'? Valid keys: " + ", ".join(
        sorted(load_config("shapes_tiny")["train"]))], proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "argument --n: must be >= 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["--attrs", "circle,square"], "the group ['circle', 'square', 'triangle'] is mutually exclusive"),
])
def test_bad_sample_arguments_are_one_line_errors(tiny_cfg, tmp_path, args, message):
    run = tmp_path / "run"
    if not run.exists():
        train(tiny_cfg(), run)
    proc = subprocess.run([PY, str(ROOT / "launch" / "sample.py"), "--run", str(run), *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_only_gmmcond_errors_become_one_line_messages(capsys):
    def user_mistake():
        raise ConfigError("train.stpes: unknown key")

    with pytest.raises(SystemExit) as exit_info:
        fail_cleanly(user_mistake)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: ConfigError: train.stpes: unknown key\n"

    def bug():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):  # not disguised as the user's mistake
        fail_cleanly(bug)
    assert issubclass(ConfigError, GmmcondError) and issubclass(CheckpointError, GmmcondError)


def test_an_experiment_runs_only_the_arms_named_and_rejects_an_unknown_one():
    from gmmcond.experiments.reproduce import DISTRIBUTION_ARMS
    from gmmcond.experiments.runner import select_arms

    picked = select_arms(DISTRIBUTION_ARMS, ["gmm_attrs, fixed pairing (paper)", "fixed value (attrs)"])
    assert list(picked) == ["fixed value (attrs)", "gmm_attrs, fixed pairing (paper)"]  # the table's order
    assert select_arms(DISTRIBUTION_ARMS, None) == DISTRIBUTION_ARMS
    with pytest.raises(ConfigError, match=r"unknown arm\(s\) \['fixed pairing'\]; this experiment's arms are: "
                                          r"'fixed value \(attrs\)'"):
        select_arms(DISTRIBUTION_ARMS, ["fixed pairing"])
