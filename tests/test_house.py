"""Loading never runs code, errors are one line of one type, the package installs its recipes."""
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from gmmcond.cli import fail_cleanly
from gmmcond.config import load_config, recipes_dir
from gmmcond.data.attrs import parse_expr
from gmmcond.data.local import CIFAR10
from gmmcond.engine.runs import load_run
from gmmcond.engine.trainer import ema_copy, train
from gmmcond.errors import AttributeSpecError, CheckpointError, ConfigError, DatasetError, GmmcondError
from gmmcond.io import load_checkpoint
from gmmcond.modeling.build import build
from gmmcond.registry import DATASETS, Registry
from gmmcond.sampling import CFGDenoiser, HeadGuidedDenoiser, sample

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


def test_head_guidance_composes_with_cfg_exactly():
    """CFG(HeadGuided(D)) = uncond + s (cond - uncond), each branch head-guided toward the same target."""
    cfg = load_config("shapes_tiny", ["head=bottleneck_attrs"])
    torch.manual_seed(0)
    parts = build(cfg)
    parts.denoiser.eval()
    guided = HeadGuidedDenoiser(parts.denoiser, parts.head, 1.5, only_present=True)
    x, sigma = torch.randn(2, 3, 16, 16), torch.full((2,), 2.0)
    attrs = torch.tensor([[1.0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]] * 2)
    cond = parts.conditioner.encode(attrs, parts.conditioner.sample_latents(2, torch.Generator().manual_seed(0)))
    uncond = parts.conditioner.unconditional(2)
    both = CFGDenoiser(guided, 2.0, uncond[0])(x, sigma, mapping_cond=cond, head_target=attrs)
    d_c = guided(x, sigma, mapping_cond=cond, head_target=attrs)
    d_u = guided(x, sigma, mapping_cond=uncond, head_target=attrs)
    torch.testing.assert_close(both, d_u + 2.0 * (d_c - d_u), atol=1e-5, rtol=1e-5)
    out = sample("euler", CFGDenoiser(guided, 2.0, uncond[0]), torch.randn(2, 3, 16, 16), torch.tensor([2.0, 1.0, 0.0]),
                 extra_args={"mapping_cond": cond, "head_target": attrs})
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=0", "train.checkpoint_every: must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.steps=-1", "train.steps: must be >= 1, got -1"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.precision=fp8", "train.precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"),
])
def test_out_of_range_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("shapes_tiny", [override])


def test_a_dotted_override_expands_a_plain_sampler_key():
    cfg = load_config("shapes", ["sample.sampler.renoise=0.5"])
    assert cfg["sample"]["sampler"] == {"type": "x0_reproject", "renoise": 0.5}
    cfg = load_config("shapes_tiny", ["sample.sampler.s_churn=0.1"])
    assert cfg["sample"]["sampler"]["type"] == "euler" and cfg["sample"]["sampler"]["s_churn"] == 0.1


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


def test_attribute_expressions_and_group_contradictions():
    names, groups = ["circle", "square", "triangle", "red", "large"], [["circle", "square", "triangle"]]
    req = parse_expr("triangle, ~red", names, groups)
    assert req.values.tolist() == [0, 0, 1, 0, 0] and req.known.tolist() == [0, 0, 1, 1, 0]
    with pytest.raises(AttributeSpecError, match=r"lists \['circle', 'square'\], but the group"):
        parse_expr("circle,square", names, groups)
    with pytest.raises(AttributeSpecError, match="negates every member of the group"):
        parse_expr("~circle,~square,~triangle", names, groups)
    with pytest.raises(AttributeSpecError, match=r"asks for \['red'\] both present and absent"):
        parse_expr("red,~red", names, groups)
    assert parse_expr("~circle", names, groups).known.tolist() == [1, 0, 0, 0, 0]


def test_every_recipe_grid_row_is_a_valid_request():
    for path in sorted(recipes_dir().glob("*.yaml")):
        cfg = load_config(path)
        if cfg["dataset"]["type"] != "shapes":
            continue  # the others need local data to know their attribute names
        data = DATASETS.build(dict(cfg["dataset"], length=16))
        for row in cfg["sample"]["grid_rows"]:
            parse_expr(row, list(data.attr_names), data.groups)
    assert load_config("shapes_tiny")["sample"]["grid_rows"] == ["circle,red", "square,blue,large"]


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


def test_register_as_a_plain_call_registers_the_class():
    reg = Registry("TEST")

    class MyThing:
        pass

    assert reg.register(MyThing) is MyThing
    assert reg.get("MyThing") is MyThing
    with pytest.raises(TypeError, match="the key must be a string"):
        reg.register(3)


def test_seeded_dpm_fast_and_adaptive_repeat_and_depend_on_the_seed():
    model = lambda x, sigma, **kw: x / (1 + sigma[:, None] ** 2)  # exact denoiser of N(0, I)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for node in ({"type": "dpm_fast", "eta": 1.0}, {"type": "dpm_adaptive", "eta": 1.0}):
        run = lambda seed: sample(node, model, noise, sigmas, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(1), run(1))
        assert not torch.equal(run(1), run(2))


def test_the_ema_copy_has_no_head_hook(tiny_cfg):
    parts = build(tiny_cfg("head=bottleneck_attrs"))
    hooked = [m for m in parts.denoiser.modules() if m._forward_hooks]
    assert len(hooked) == 1
    ema = ema_copy(parts.denoiser)
    assert not [m for m in ema.modules() if m._forward_hooks]
    parts.head.features = None
    ema(torch.randn(1, 3, 16, 16), torch.ones(1), mapping_cond=parts.conditioner.unconditional(1))
    assert parts.head.features is None  # the EMA forward does not feed the live head


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


def test_importing_gmmcond_prints_no_pkg_resources_warning():
    proc = subprocess.run([PY, "-W", "always", "-c", "import gmmcond"], capture_output=True, text=True)
    assert proc.returncode == 0 and "pkg_resources" not in proc.stderr, proc.stderr


def test_no_sys_path_edits_and_no_design_doc_references():
    files = [*ROOT.glob("launch/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("gmmcond/**/*.py")]
    offenders = [str(f) for f in files if f != Path(__file__) and "sys.path.insert" in f.read_text()]
    assert offenders == []
    assert "DESIGN.md" not in (ROOT / "README.md").read_text()


def test_a_wheel_ships_every_subpackage_and_the_recipes(tmp_path):
    proc = subprocess.run([PY, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    recipes = sorted(p.name for p in (ROOT / "registry").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("gmmcond/recipes/")) == recipes
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "gmmcond").rglob("__init__.py"))
    assert all(f"{p}/__init__.py" in names for p in packages), packages
    assert "gmmcond/eval/weights/shapes16.safetensors" in names
    # installed without the checkout, the recipes are found by name
    target = tmp_path / "site"
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(next(tmp_path.glob("*.whl")))],
                   check=True, capture_output=True)
    code = "import gmmcond.config as c; print(c.RECIPES); print(c.load_config('shapes')['name'])"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(target / "gmmcond" / "recipes"), "shapes"]
