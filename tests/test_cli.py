"""Every mistake at the command line is one line naming the thing and the fix, exit 2, no traceback."""
import subprocess
from pathlib import Path

import pytest

from entry import PY, ROOT, assert_one_line, run_entry
from gmmcond.cli import fail_cleanly
from gmmcond.config import load_config
from gmmcond.errors import CheckpointError, ConfigError, GmmcondError

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
def test_train_config_mistakes_are_one_line(args, fragment, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    args = [str(bad) if a == "{bad}" else a for a in args]
    if "--config" not in args:
        args = ["--config", "shapes_tiny", *args]
    code, err = run_entry("train", *args, "--runs", tmp_path / "runs")
    assert_one_line(code, err, fragment)
    if str(bad) in args:
        assert err.startswith(f"error: ConfigError: {bad}:4:6: not valid YAML") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--cfg-scale", "-1"], "argument --cfg-scale: must be >= 0"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: must be >= 0"),
    (["--attrs", "circle,purple"], "unknown attribute(s) ['purple']"),
])
def test_sample_mistakes_are_one_line(tiny_run, args, fragment):
    code, err = run_entry("sample", "--run", tiny_run, *args, "--n", 2, "--steps", 2)
    assert code == 2 and fragment in err and "Traceback" not in err, err


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
    (["--cfg-scale", "2", "--cfg-interval", "5", "1"], "cfg_interval: must be [lo, hi] with 0 <= lo < hi"),
])
def test_bad_sample_arguments_are_one_line_errors(tiny_run, args, message):
    code, err = run_entry("sample", "--run", tiny_run, *args)
    assert code == 2 and message in err and "Traceback" not in err, err


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


@pytest.mark.parametrize("command, fragment", [
    ("recipes", "recipes needs --runs RUN [RUN ...], trained runs of several recipes"),
    ("peer", "peer needs --runs RUN [RUN ...], trained runs of one recipe"),
    ("sampler-budget", "sampler-budget needs --runs RUN [RUN ...], trained runs of one recipe"),
    ("ema-lengths", "ema-lengths needs --runs RUN [RUN ...], runs of one recipe trained with train.posthoc_ema"),
])
def test_benchmarks_that_score_trained_runs_name_the_missing_runs(command, fragment, tmp_path):
    code, err = run_entry("benchmark", command, "--out", tmp_path)
    assert_one_line(code, err, fragment)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
