"""Attribute editing: inversion is the exact inverse of k-diffusion's Euler sampler; SDEdit; edit requests; the CLI."""

import json

import k_diffusion as K
import pytest
import torch

from entry import run_captured
from gmmcond.data.attrs import parse_expr
from gmmcond.data.shapes import ATTR_NAMES, COLOURS, SHAPES
from gmmcond.errors import ConfigError
from gmmcond.modeling.build import build
from gmmcond.modeling.runs import load_run
from gmmcond.sampling import sample
from gmmcond.sampling.edit import apply_edit, edit_by_inversion, invert_euler, sdedit, start_sigmas
from gmmcond.data.attrs import read_attributes
from gmmcond.sampling.settings import SamplingSettings
from gmmcond.sampling.testbed import GaussianMixtureDenoiser

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
NAMES, GROUPS = list(ATTR_NAMES), [list(SHAPES), list(COLOURS)]


def test_inversion_then_k_diffusion_euler_returns_the_input_on_the_exact_testbed():
    bed = GaussianMixtureDenoiser.default(d=2)
    x0 = bed.sample(64, torch.Generator().manual_seed(0))
    sigmas = K.sampling.get_sigmas_karras(20, 0.01, 20.0).double()
    errors = {}
    for iters in (0, 60):
        x_t = invert_euler(bed, x0, sigmas, iters=iters)
        back = K.sampling.sample_euler(bed, x_t, sigmas, disable=True)
        errors[iters] = (back - x0).abs().max().item()
    assert errors[60] < 1e-12  # the fixed point solves every Euler step backwards, to float64 precision
    assert errors[0] > 0.1  # plain DDIM inversion only approximates it


@pytest.fixture
def parts():
    """The tiny recipe's components with weights moved off their (zero-output) initialisation: a nonlinear model."""
    from gmmcond.config import load_config

    torch.manual_seed(0)
    parts = build(load_config("shapes_tiny"))
    with torch.no_grad():
        for p in parts.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    parts.denoiser.eval()
    items = [parts.dataset[i] for i in range(4)]
    return parts, torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


def test_inverting_then_regenerating_with_the_same_attributes_reproduces_the_image(parts):
    parts, x, a = parts
    again = edit_by_inversion(parts, x, a, a, SamplingSettings(sampler="euler", steps=10, cfg_scale=2.0, seed=3), iters=25)
    assert (again - x).abs().max().item() < 2e-3  # pixels in [-1, 1]
    rough = edit_by_inversion(parts, x, a, a, SamplingSettings(sampler="euler", steps=10, cfg_scale=2.0, seed=3), iters=0)
    assert (rough - x).abs().max().item() > 0.1


def test_an_edit_changes_the_output_and_depends_on_the_target(parts):
    parts, x, a = parts
    target = apply_edit(a, parse_expr("blue", NAMES, GROUPS), NAMES, GROUPS)
    same = edit_by_inversion(parts, x, a, a, SamplingSettings(sampler="euler", steps=5), iters=3)
    edited = edit_by_inversion(parts, x, a, target, SamplingSettings(sampler="euler", steps=5), iters=3)
    assert (edited - same).abs().max().item() > 1e-3


def test_sdedit_starts_from_the_noised_image_at_the_strength(parts):
    parts, x, a = parts
    tail = start_sigmas(parts, 10, 0.3, "cpu")
    assert torch.equal(tail, parts.schedule.sigmas(10)[7:])
    assert torch.equal(start_sigmas(parts, 10, 1.0, "cpu"), parts.schedule.sigmas(10))
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="strength must be in"):
            start_sigmas(parts, 10, bad, "cpu")
    weak = sdedit(parts, x, a, SamplingSettings(sampler="euler", steps=10, seed=1), strength=0.1)
    strong = sdedit(parts, x, a, SamplingSettings(sampler="euler", steps=10, seed=1), strength=1.0)
    assert (weak - x).abs().mean() < (strong - x).abs().mean()
    assert torch.equal(sdedit(parts, x, a, SamplingSettings(sampler="euler", steps=10, seed=1), strength=0.5), sdedit(parts, x, a, SamplingSettings(sampler="euler", steps=10, seed=1), strength=0.5))


def test_sample_with_a_zero_init_is_sampling_from_noise():
    bed = GaussianMixtureDenoiser.default(d=2)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = K.sampling.get_sigmas_karras(5, 0.01, 20.0).double()
    assert torch.equal(sample("euler", bed, noise, sigmas), sample("euler", bed, noise, sigmas, init=torch.zeros_like(noise)))


def test_an_edit_request_changes_only_what_it_names():
    source = parse_expr("circle,red,large,top", NAMES, GROUPS).values[None]
    out = apply_edit(source, parse_expr("square,~large,outline", NAMES, GROUPS), NAMES, GROUPS)
    assert [n for n, v in zip(NAMES, out[0]) if v] == ["square", "red", "top", "outline"]
    assert torch.equal(apply_edit(source, parse_expr("", NAMES, GROUPS), NAMES, GROUPS), source)


def test_read_attributes_picks_one_member_per_group():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.9, 0.8, 0.1, 0.6, 0.4, 0.5, 0.51, 0.0]])
    assert [n for n, v in zip(NAMES, read_attributes(probs, NAMES, GROUPS)[0]) if v] == ["circle", "red", "large", "dark_bg"]


def test_the_experiment_oracle_renders_exactly_the_requested_target():
    from gmmcond.experiments.editing import EDIT_KINDS, edit_targets, oracle_params
    from gmmcond.registry import DATASETS

    test = DATASETS.build({"type": "shapes", "split": "test", "length": 16})
    attrs = torch.stack([test[i][1] for i in range(16)])
    for kind in EDIT_KINDS:
        target = edit_targets(attrs, kind, NAMES)
        assert ((target != attrs).sum(1) == (2 if kind in ("colour", "shape") else 1)).all()
        for i in range(16):
            p = oracle_params(test, i, kind, i)
            assert torch.equal(torch.from_numpy(p.attrs()), target[i]), (kind, i)
            assert (p.cx, p.cy, p.radius) == (test.params(i).cx, test.params(i).cy, test.params(i).radius)


def test_the_cli_writes_an_edit_grid_and_names_a_bad_request(tiny_cfg, tmp_path):
    from gmmcond.data.shapes import render
    from gmmcond.engine.trainer import train
    from gmmcond.registry import DATASETS

    run = tmp_path / "run"
    train(tiny_cfg(), run)
    image = tmp_path / "shape.png"
    render(DATASETS.build({"type": "shapes", "split": "test"}).params(0), 16).save(image)
    cmd = ["--run", run, "--edit", image, "--n", "2"]
    ok = run_captured("sample", *cmd, "--attrs", "blue", "--source-attrs", "circle,red", "--out", tmp_path / "e.png")
    assert ok.returncode == 0, ok.stderr
    assert "source attributes: circle,red" in ok.stdout and "asks for: circle,blue" in ok.stdout
    assert (tmp_path / "e.png").exists()
    bad = run_captured("sample", *cmd, "--attrs", "purple", "--source-attrs", "circle,red")
    assert bad.returncode == 2 and "unknown attribute(s) ['purple']" in bad.stderr


def test_the_editing_experiment_edits_at_the_guidance_it_is_given_and_resumes(tiny_run, tmp_path, monkeypatch):
    """reproduce.py editing --cfg-scale: every edit is keyed, logged and summarised at that guidance (the run's own
    when not given), and a rerun computes nothing it has logged."""
    import gmmcond.experiments.editing as editing_mod
    from gmmcond.experiments.runner import EXPERIMENTS

    exp = EXPERIMENTS["editing"]
    opts = exp.options({"out": tmp_path / "ed", "run": tiny_run, "seeds": 1, "n": 2, "steps": 2, "cfg_scale": 3.0})
    result = exp(opts)
    records = [json.loads(line) for line in (tmp_path / "ed" / "editing.jsonl").read_text().splitlines()]
    assert result["config"]["cfg_scale"] == 3.0 and records and {r["cfg_scale"] for r in records} == {3.0}
    assert set(result["edits"]) == {f"{m} / {k}" for m in editing_mod.EDIT_METHODS for k in editing_mod.EDIT_KINDS}
    calls = []
    monkeypatch.setattr(editing_mod, "edit_scores", lambda *a, **k: calls.append(1) or {})
    assert exp(opts)["edits"] == result["edits"] and calls == []  # resumed: nothing edited or scored again
    monkeypatch.undo()
    own = exp.options({"out": tmp_path / "own", "run": tiny_run, "seeds": 1, "n": 2, "steps": 2})
    assert exp(own)["config"]["cfg_scale"] == load_run(tiny_run).cfg["sample"]["cfg_scale"]
