"""A training that meets a cluster, a full disk or someone else's data keeps its work and says one line:
scheduler signals (SIGTERM, SIGUSR1), failed writes, a recipe on other data, overrides anywhere, and several
processes on the CPU (each case: the exit status, no traceback, the message, what is kept on disk)."""
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml
import pytest
import torch
from PIL import Image

from gmmcond.errors import REQUEUE_EXIT, StorageError
from gmmcond.io import latest_checkpoint, load_checkpoint, read_json, write_atomically, write_json

from entry import PY, ROOT, run_entry

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def timeless(run: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")}
            for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def wait_for_lines(metrics: Path, lines: int, proc, limit: float = 120) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < lines):
        time.sleep(0.2)


def test_a_scheduler_signal_checkpoints_says_one_line_and_asks_to_be_requeued(tmp_path):
    """What a scheduler sends before SIGKILL (SIGTERM, SIGUSR1; one run each, side by side on a thread apiece): the
    step finishes, a checkpoint is written, one line names it and the resume command, exit 75 (EX_TEMPFAIL: try
    again); --resume auto then finishes the run."""
    args = ["--config", "shapes_tiny", "--runs", str(tmp_path), "train.steps=60", "train.checkpoint_every=1000",
            "train.log_every=1", "train.cpu_threads=1"]
    procs = {sig: subprocess.Popen([PY, str(ROOT / "launch" / "train.py"), *args, "--name", sig], env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for sig in ("SIGTERM", "SIGUSR1")}
    waiting, deadline = dict(procs), time.time() + 120
    while waiting and time.time() < deadline:  # each signalled as soon as it has logged 20 steps
        for sig, proc in list(waiting.items()):
            metrics = tmp_path / sig / "metrics.jsonl"
            if proc.poll() is not None or (metrics.exists() and len(metrics.read_text().splitlines()) >= 20):
                proc.send_signal(getattr(signal, sig))
                del waiting[sig]
        time.sleep(0.02)
    for sig, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == REQUEUE_EXIT == 75 and "Traceback" not in err, err[-3000:]
        line = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(line) == 1 and f"Interrupted: stopped by {sig} after step" in line[0], err[-2000:]
        assert line[0].endswith(f"--name {sig} --resume") and f"{sig} received; finishing this step" in out
        cut_at = int(line[0].split("after step ")[1].split()[0])
        assert cut_at < 60 and latest_checkpoint(tmp_path / sig).name == f"step_{cut_at:07d}.pt"
        # the stop is the one Ctrl-C takes, whose resume is shown exact in tests/test_resume.py: here the requeue path
        code, err = run_entry("train", *args, "--name", sig, "--resume", "auto")
        assert code == 0 and load_checkpoint(latest_checkpoint(tmp_path / sig))["step"] == 60, err[-2000:]


def fail_after(nbytes: int, error: Exception):
    """A writer that writes ``nbytes`` of a file, then fails as a full disk does."""
    def write(tmp: Path) -> None:
        Path(tmp).write_bytes(b"x" * nbytes)
        raise error
    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 64")])
def test_a_failed_write_names_the_path_removes_its_temporary_file_and_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "eval.json"
    write_json(path, {"good": 1})
    with pytest.raises(StorageError, match=r"could not write .*eval.json \(.*; .* free there\): free some space or "
                                           r"choose another folder, then run the command again; the previous eval.json is as it was"):
        write_atomically(path, fail_after(100, error))
    assert read_json(path) == {"good": 1} and [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    with pytest.raises(RuntimeError, match="a bug"):  # a RuntimeError that is not about the disk stays itself
        write_atomically(path, fail_after(1, RuntimeError("a bug")))


def test_a_full_disk_while_checkpointing_is_one_line_and_latest_stays(tiny_cfg, tmp_path, monkeypatch):
    import gmmcond.io as gio

    real_save = torch.save
    calls = []

    def save(state, f):  # the second checkpoint meets a full disk, as torch reports it
        calls.append(state["step"])
        if state["step"] == 4:
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        real_save(state, f)

    monkeypatch.setattr(gio.torch, "save", save)
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tmp_path, "train.steps=6")
    errors = [l for l in err.splitlines() if "error:" in l]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "StorageError: could not write" in errors[0] and "step_0000004.pt" in errors[0] and "free there" in errors[0]
    assert "Training stopped at step 4; " in errors[0] and "step_0000002.pt ('latest') is intact: continue from it with --resume" in errors[0]
    folder = tmp_path / "shapes_tiny" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_0000002.pt"]  # no temporary file left
    assert load_checkpoint(folder / "step_0000002.pt")["step"] == 2


def test_a_real_full_file_system(tmp_path):
    """On a 600 kB tmpfs (where this process may mount one) the CLI meets ENOSPC for real."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        proc = subprocess.run([PY, str(ROOT / "launch" / "train.py"), "--config", "shapes_tiny", "--runs", str(mount),
                               "train.steps=8", "train.checkpoint_every=1"],
                              env=ENV, capture_output=True, text=True, timeout=300)
        errors = [l for l in proc.stderr.splitlines() if "error:" in l]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
        assert "StorageError: could not write" in errors[0] and "free there" in errors[0], errors[0]
        run = mount / "shapes_tiny"
        assert not [p for p in run.rglob(".*.tmp*")]
        kept = latest_checkpoint(run)
        assert kept is not None and load_checkpoint(kept)["step"] >= 1
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def image_folder(root: Path, n: int = 8) -> Path:
    root.mkdir()
    lines = ["file,a,b"]
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{1 - i % 2}")
    (root / "attrs.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_recipe_on_other_data_draws_its_grid_rows_from_the_data_and_says_so(tmp_path):
    data = image_folder(tmp_path / "data")
    node = f"dataset={{type: imagefolder_attrs, root: {data}, size: 16, holdout: 0}}"
    code, out = run_entry("train", "--config", "shapes_tiny", node, "--runs", tmp_path, "train.batch_size=4",
                          stdout=True)
    assert code == 0, out
    assert "sample.grid_rows ['circle,red', 'square,blue,large']... name no attribute of this dataset" in out
    assert (tmp_path / "shapes_tiny" / "samples" / "grid_0000003.png").exists()


def test_a_grid_row_with_a_typo_is_refused_before_the_first_step(tmp_path):
    code, err = run_entry("train", "--config", "shapes_tiny", "--runs", tmp_path, "sample.grid_rows=[circle+red,circle]")
    assert code == 2 and "Traceback" not in err
    assert "ConfigError: sample.grid_rows: unknown attribute(s) ['circle+red']" in err
    assert not (tmp_path / "shapes_tiny" / "checkpoints" / "latest").exists()


def test_overrides_go_anywhere_on_the_command_line(tmp_path):
    code, err = run_entry("train", "--config", "shapes_tiny", "train.steps=2", "--runs", tmp_path, "model.channels=[8,24]")
    assert code == 0, err
    cfg = yaml.safe_load((tmp_path / "shapes_tiny" / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["model"]["channels"] == [8, 24]
    code, err = run_entry("train", "--config", "shapes_tiny", "--resume", "train.steps=4", "--runs", tmp_path,
                          "model.channels=[8,24]")  # a bare --resume before an override
    assert code == 0, err
    assert latest_checkpoint(tmp_path / "shapes_tiny").name == "step_0000004.pt"


def torchrun(*args, port: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(ROOT / "launch" / "train.py"), *map(str, args)]


def test_kill_9_of_one_process_of_two_then_resume_gives_the_uninterrupted_losses(tmp_path):
    """Two CPU processes: one killed with SIGKILL and the run resumed from its last checkpoint, against the same run
    uninterrupted, started beside it by the README's multi-process command (accelerate launch --multi_gpu)."""
    if torch.cuda.is_available():
        pytest.skip("a machine with GPUs runs this on them")
    args = ["--config", "shapes_tiny", "--runs", tmp_path, "train.steps=60", "train.checkpoint_every=20",
            "train.log_every=1", "train.cpu_threads=1"]
    accelerate = [str(Path(PY).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "29533", str(ROOT / "launch" / "train.py")]
    full = subprocess.Popen([*accelerate, *map(str, args), "--name", "full"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(torchrun(*args, "--name", "cut", port=29531), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_lines(tmp_path / "cut" / "metrics.jsonl", 30, proc)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "launch/train.py"], capture_output=True, text=True)
    os.kill(int(ranks.stdout.split()[-1]), signal.SIGKILL)  # one of the two training processes
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "process 0 of 2 (MULTI_CPU, cpu)" in out and "process 1 of 2 (MULTI_CPU, cpu)" in out  # a line per rank
    kept = latest_checkpoint(tmp_path / "cut")
    assert kept is not None and 20 <= load_checkpoint(kept)["step"] < 60
    resumed = subprocess.run(torchrun(*args, "--name", "cut", "--resume", port=29532), env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    # the uninterrupted two-process run starts a process a rank, stays in sync and writes each file once
    assert "process 0 of 2 (MULTI_CPU, cpu)" in out and "process 1 of 2 (MULTI_CPU, cpu)" in out
    assert "2 process(es)" in out + err and "parameters identical across 2 processes" in out
    assert [m["step"] for m in timeless(tmp_path / "full")] == list(range(1, 61))
    names = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert names == ["latest", "step_0000040.pt", "step_0000060.pt"]
    assert sorted(p.name for p in (tmp_path / "full" / "samples").iterdir()) == ["grid_0000060.png"]
    assert len(load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000060.pt")["rng"]) == 2
    assert timeless(tmp_path / "cut") == timeless(tmp_path / "full")
    a = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000060.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000060.pt")
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())
