"""Composition: CoInD's JSD diagnostic on toys with a known answer, and its independence penalty."""
import math

import pytest
import torch
from torch import nn

from gmmcond.modeling.objective import TrainingObjective
from gmmcond.errors import ConfigError
from gmmcond.eval.independence import factorisation_gap, js_divergence, jsd_diagnostic
from gmmcond.modeling.build import Components, build
from gmmcond.modeling.conditioners import GMMAttrs


def test_js_divergence_closed_forms():
    p, q = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), abs=1e-12)
    assert js_divergence(p, p).item() == 0


def test_independent_attributes_score_zero_and_dependent_ones_do_not():
    gen = torch.Generator().manual_seed(0)
    f, g = torch.randn(2, 50, generator=gen), torch.randn(2, 50, generator=gen)
    joint = torch.stack([f[a] + g[b] for a in (0, 1) for b in (0, 1)])  # log p(a, b) = f(a) + g(b): independent
    assert factorisation_gap(joint, f + 7.0, g - 2.0).abs().max() < 1e-12  # marginals up to a constant
    coupled = joint + 4.0 * torch.tensor([1.0, 0, 0, 1])[:, None]  # a == b is favoured: dependent
    gap = factorisation_gap(coupled, f, g)
    assert gap.min() > 1e-4 and gap.mean() > 0.05 and gap.max() <= math.log(2)


def test_the_diagnostic_runs_on_a_partial_model(tiny_cfg):
    torch.manual_seed(0)
    parts = build(tiny_cfg("conditioner.attr_dropout=0.3"))
    parts.denoiser.eval()
    images = torch.stack([parts.dataset[i][0] for i in range(6)])
    out = jsd_diagnostic(parts, images, 2, 3, sigmas=(0.5, 1.0))
    assert len(out["per_image"]) == 6 and 0 <= out["jsd"] <= math.log(2)
    with pytest.raises(ConfigError, match="attr_dropout"):  # a model that never saw unspecified attributes
        jsd_diagnostic(build(tiny_cfg()), images, 2, 3)


class LinearInCond(nn.Module):
    """A denoiser whose output is affine in mapping_cond: its joint composes exactly from its marginals."""

    def __init__(self, dim: int, nonlinear: bool = False):
        super().__init__()
        self.w = nn.Linear(dim, 3 * 16 * 16)
        self.nonlinear = nonlinear

    def forward(self, x, sigma, mapping_cond):
        h = self.w(mapping_cond)
        h = torch.tanh(3 * h) if self.nonlinear else h
        return x / (1 + sigma[:, None, None, None] ** 2) + h.view(-1, 3, 16, 16)


def test_the_coind_penalty_vanishes_exactly_for_a_composable_model():
    cond = GMMAttrs(num_attrs=5, attr_dropout=0.3)
    x, noise = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    attrs, sigma = (torch.rand(8, 5) > 0.5).float(), torch.rand(8) + 0.5
    torch.manual_seed(0)
    for nonlinear, check in ((False, lambda p: p.abs().max() < 1e-10), (True, lambda p: p[:4].min() > 1e-4)):
        parts = Components(None, cond, LinearInCond(cond.dim, nonlinear).double(), None, None, [], [])
        trainer = TrainingObjective(parts, coind_weight=1.0, coind_fraction=0.5)
        penalty = trainer.coind_penalty(x.double(), attrs.double(), torch.arange(8), noise.double(), sigma.double())
        assert penalty.shape == (8,) and (penalty[4:] == 0).all() and check(penalty)


def test_coind_training_logs_its_penalty_and_needs_a_partial_conditioner(tiny_cfg, tmp_path):
    from gmmcond.engine.trainer import train
    from gmmcond.io import read_metrics

    train(tiny_cfg("conditioner.attr_dropout=0.3", "train.coind_weight=0.5", "train.log_every=1"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["coind"] >= 0 for r in rows) and all(r["loss"] >= r["diffusion"] for r in rows)
    with pytest.raises(ConfigError, match="needs conditioner.attr_dropout > 0"):
        train(tiny_cfg("train.coind_weight=0.5"), tmp_path / "plain")


@pytest.mark.parametrize("arm", ["features + per-sample dropout + CoInD", "features, open from data"])
def test_the_combination_experiment_scores_an_arm_end_to_end(tmp_path, arm):
    """One arm at a toy scale (3 steps of a small model): every number the README table shows is produced."""
    from gmmcond.experiments.reproduce import combination_arms, combination_scores

    recipe, overrides = combination_arms(3)[arm]
    tiny = ["model.channels=[8,8,8]", "model.depths=[1,1,1]", "model.mapping_out=16", "sample.steps=2",
            "train.batch_size=8", "train.checkpoint_every=3"]
    rec = combination_scores(arm, 0, recipe, [*overrides, *tiny], tmp_path / "run", 4, out=tmp_path / "combinations.png")
    assert rec["steps"] == 3 and rec["per"] == 4
    for key in ("conformity_seen", "conformity_held_out", "defects_seen", "defects_held_out", "negation_conformity",
                "unspecified_tv_max", "free_error_seen", "free_floor_seen", "free_error_held_out", "free_floor_held_out",
                "single_negation_conformity", "single_negation_error", "single_negation_floor"):
        assert 0 <= rec[key] <= 1, key
    assert rec["spread_seen"] > 0 and rec["spread_held_out"] > 0
    if "CoInD" in arm:
        assert 0 <= rec["jsd_triangle_red"] <= math.log(2) and 0 <= rec["jsd_circle_red"] <= math.log(2)
    else:  # the data arm asks a model without attr_dropout: no JSD (it cannot hide attributes)
        assert "jsd_triangle_red" not in rec
    slug = arm.replace(",", "").replace(" ", "_").replace("+", "and")
    assert (tmp_path / f"combinations_{slug}.png").exists()


def test_arms_that_differ_only_in_sampling_share_one_training(tmp_path, monkeypatch):
    """The composed, all-specified and all-unknown-CFG arms ask the attr_dropout model differently: they reuse its
    run folder instead of training it again, and are still logged under their own configs; each swept
    attr_dropout rate's two arms share that rate's run; every other arm trains its own."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.reproduce import ResultLog, combination_arms, combination_training, combinations
    from gmmcond.experiments.runner import Options

    joint, cfg_arm = "features + attr_dropout joint", "features + attr_dropout, CFG from all-unknown"
    samplers = (*reproduce.COMPOSED_WEIGHTS, cfg_arm, "features + attr_dropout, all specified",
                "features + attr_dropout, open from data")
    owners, arms = combination_training(), combination_arms(500, "recipe")
    assert all(owners[a] == joint for a in samplers) and all(arms[a] == arms[joint] for a in samplers if a != cfg_arm)
    assert arms[cfg_arm][1] == [*arms[joint][1], "sample.cfg_null=all_unknown"]
    # a composed arm asks with its own per-term weights
    from gmmcond.data.shapes import ShapesDataset
    from gmmcond.registry import DATASETS
    test, plain = DATASETS.build({"type": "shapes", "size": 16, "split": "test", "length": 512}), ShapesDataset()
    names = plain.attr_names
    _, _, compose = reproduce._combination_requests(test, names, plain.groups, "triangle", "red", "composed",
                                                    reproduce.combination_indices(test, "triangle", "red", 4), (3.0, 1.0))
    assert compose == [(names.index("triangle"), 3.0), (names.index("red"), 1.0)]
    seen = []
    monkeypatch.setattr(reproduce, "combination_scores",  # no training: record which run folder each arm gets
                        lambda arm, seed, recipe, full, run, per, out: seen.append((arm, run)) or {"x": 1.0})
    combinations(Options(tmp_path, seeds=1, steps=500, n=64, scale="recipe"))
    runs = dict(seen)
    assert set(runs) == set(arms) and all(runs[a] == runs[joint] for a in samplers)
    # the rate sweep: each rate's model asked two ways shares its own run, not the default rate's
    for rate in ("0.1", "0.5"):
        own = runs[f"features + attr_dropout {rate} joint"]
        assert runs[f"features + attr_dropout {rate}, all specified"] == own != runs[joint]
    # the plain model asked for shape and colour with the rest drawn from the data is the "features joint" training
    assert owners["features, open from data"] == "features joint" and runs["features, open from data"] == runs["features joint"]
    assert len(set(runs.values())) == len(set(owners.values())) == len(arms) - len(samplers) - 3
    assert {r["arm"] for r in ResultLog(tmp_path / "combinations.jsonl").records} == set(arms)
    # --no-train tabulates what is logged and starts nothing: seed 1 is missing, each row says it has one seed
    monkeypatch.setattr(reproduce, "combination_scores", lambda *a, **k: pytest.fail("--no-train trained an arm"))
    table = combinations(Options(tmp_path, seeds=2, steps=500, n=64, scale="recipe", train=False))
    assert set(table["arms"]) == set(arms) and all(a["x"]["n"] == 1 for a in table["arms"].values())


def test_an_arm_another_experiment_already_ran_is_reused_not_retrained(tmp_path, monkeypatch):
    """Fig. 9's "no head" at the recipe scale is Fig. 7's "features" (same resolved config but for the grid
    cadence, same evaluation): with Fig. 7's log passed as ``reuse`` it is logged from there, the head arms
    train; a log evaluated with another n, or a record without a key, is not taken."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.reproduce import HEAD_ARMS, ResultLog, features_vs_classes, head
    from gmmcond.experiments.runner import Options, result_key

    trained = []

    def fake(recipe, full, run, *, n):  # no training: record what would have trained, return a loss to log
        trained.append((recipe, tuple(full), n))
        from gmmcond.data.shapes import COLOURS, SHAPES

        return {"last100": 0.01 * len(trained), "curve_steps": [1], "curve": [0.1],
                "per_attribute": dict.fromkeys((*SHAPES, *COLOURS), 1.0)}

    monkeypatch.setattr(reproduce, "train_and_evaluate", fake)
    monkeypatch.setattr(reproduce, "plot_loss_bands", lambda *a, **k: None)
    features_vs_classes(Options(tmp_path, seeds=2, steps=6000, n=256, scale="recipe"))
    assert len(trained) == 6
    fvc = ResultLog(tmp_path / "features-vs-classes.jsonl")
    trained.clear()
    head(Options(tmp_path, seeds=2, steps=6000, n=256, scale="recipe", reuse=(fvc,)))
    assert len(trained) == 4 and all("head=none" not in full for _, full, _ in trained)  # only the two head arms
    log = ResultLog(tmp_path / "head.jsonl")
    for seed in range(2):
        mine = log.done(("arm", "seed"), arm="no head", seed=seed)
        theirs = fvc.done(("arm", "seed"), arm="features (11)", seed=seed)
        assert mine["reused_from"] == theirs["config"] and mine["last100"] == theirs["last100"]
        assert mine["run"] == theirs["run"] and mine["config"] != theirs["config"]  # logged under its own config
    # the key ignores the grid cadence, not what trains or how it is evaluated
    base = ["train.steps=6000", "train.seed=0", "conditioner.seed=0"]
    key = result_key("shapes", base, "train_and_evaluate n=256")
    assert key == result_key("shapes", [*base, "train.grid_every=0", "head=none"], "train_and_evaluate n=256")
    assert key != result_key("shapes", base, "train_and_evaluate n=512")
    assert key != result_key("shapes", [*base, "train.lr=1e-3"], "train_and_evaluate n=256")
    # evaluated with another n: nothing to reuse, every arm trains
    trained.clear()
    head(Options(tmp_path / "n512", seeds=1, steps=6000, n=512, scale="recipe", reuse=(fvc,)))
    assert len(trained) == len(HEAD_ARMS)


def test_guidance_can_push_away_from_the_all_unknown_condition(tiny_cfg):
    """sample.cfg_null=all_unknown: CFG's second branch is the condition with every attribute unspecified (not
    the dropped one), exactly D_null + s (D_cond - D_null); a run without attr_dropout refuses it."""
    from gmmcond.config import load_config
    from gmmcond.sampling.generate import conditioned

    torch.manual_seed(0)
    parts = build(tiny_cfg("conditioner.attr_dropout=0.3"))
    parts.denoiser.eval()
    with torch.no_grad():  # k-diffusion zero-initialises the layers the condition enters by: make it matter
        for p in parts.denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cond = parts.conditioner
    attrs = torch.stack([parts.dataset[i][1] for i in range(4)])
    z = cond.sample_latents(4, torch.Generator().manual_seed(1))
    x, sigma = torch.randn(4, 3, 16, 16), torch.full((4,), 0.8)
    with torch.no_grad():
        outs = {}
        for which in ("dropped", "all_unknown"):
            model, extra = conditioned(parts, attrs, z, cfg_scale=2.0, cfg_null=which)
            outs[which] = model(x, sigma, **extra)
        c = parts.denoiser(x, sigma, mapping_cond=extra["mapping_cond"])
        u = parts.denoiser(x, sigma, mapping_cond=cond.all_unknown(4))
    torch.testing.assert_close(outs["all_unknown"], u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert (outs["all_unknown"] - outs["dropped"]).abs().max() > 1e-4
    assert cond.all_unknown(1)[0, -1] == 0 and cond.guidance_null(1)[0, -1] == 1  # present but all unknown vs dropped
    with pytest.raises(ConfigError, match="cfg_null=all_unknown needs a run trained with conditioner.attr_dropout > 0"):
        conditioned(build(tiny_cfg()), attrs, z[:, :, :], cfg_scale=2.0, cfg_null="all_unknown")
    with pytest.raises(ConfigError, match="sample.cfg_null: must be one of dropped, all_unknown"):
        load_config("shapes_tiny", ["sample.cfg_null=unknown"])


def test_the_experiment_registry_says_which_options_each_experiment_takes(tmp_path):
    """launch/reproduce.py is a thin entry point over EXPERIMENTS: an option an experiment does not take is an error
    naming the experiments that do; what is not given comes from the experiment's defaults."""
    from gmmcond.errors import ConfigError
    from gmmcond.experiments import editing, reproduce  # noqa: F401  (fill the registry)
    from gmmcond.experiments.runner import EXPERIMENTS

    assert {"density", "ngmg-vs-bce", "head", "features-vs-classes", "distribution", "precision", "combinations",
            "editing"} <= set(EXPERIMENTS)
    opts = EXPERIMENTS["head"].options({"out": tmp_path, "seeds": 5, "steps": None, "arms": ("no head",)})
    assert (opts.seeds, opts.steps, opts.n, opts.scale, opts.arms) == (5, 1000, 512, "v1", ("no head",))
    with pytest.raises(ConfigError, match="--arms applies to head, distribution, combinations, not precision"):
        EXPERIMENTS["precision"].options({"out": tmp_path, "arms": ("fp32",)})
    with pytest.raises(ConfigError, match="--run applies to editing, not density"):
        EXPERIMENTS["density"].options({"out": tmp_path, "run": tmp_path})


def test_a_logged_result_is_computed_once_and_read_back(tmp_path):
    """ResultLog.once, the resumable unit of every experiment: a key already logged is read back, not computed."""
    from gmmcond.io import ResultLog

    calls = []
    log = ResultLog(tmp_path / "log.jsonl")
    first = log.once({"arm": "a", "seed": 0}, lambda: calls.append(1) or {"x": 1.5})
    again = ResultLog(tmp_path / "log.jsonl").once({"arm": "a", "seed": 0}, lambda: calls.append(2) or {"x": 9.0})
    other = log.once({"arm": "a", "seed": 1}, lambda: calls.append(3) or {"x": 2.5})
    assert calls == [1, 3] and first == again == {"arm": "a", "seed": 0, "x": 1.5} and other["x"] == 2.5
