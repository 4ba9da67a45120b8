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


def test_the_authors_coind_form_is_the_noise_gap_over_one_whole_group(monkeypatch):
    """coind_space=noise: the gap between noise predictions (x - D) / sigma, the denoised gap over sigma squared;
    coind_unit=group: the unit left out is one whole group (CoInD's label column), else one attribute."""
    cond = GMMAttrs(num_attrs=5, attr_dropout=0.3)
    cond.set_groups([[0, 1, 2]])
    x, noise = torch.randn(8, 3, 16, 16).double(), torch.randn(8, 3, 16, 16).double()
    attrs, sigma = (torch.rand(8, 5) > 0.5).double(), (torch.rand(8) + 0.5).double()
    parts = Components(None, cond, LinearInCond(cond.dim, True).double(), None, None, [], [])

    def penalty(**form):
        torch.manual_seed(1)
        return TrainingObjective(parts, coind_weight=1.0, coind_fraction=1.0, **form).coind_penalty(
            x, attrs, torch.arange(8), noise, sigma)

    assert torch.allclose(penalty(coind_space="noise"), penalty() / sigma.float() ** 2, rtol=1e-6)
    seen = []
    encode = cond.encode
    monkeypatch.setattr(cond, "encode", lambda a, z, known=None: seen.append(known) or encode(a, z, known=known))
    for unit, allowed in (("group", [{0, 1, 2}, {3}, {4}]), ("attribute", [{k} for k in range(5)])):
        seen.clear()
        penalty(coind_unit=unit)
        left_out = [set(torch.nonzero(row < 0.5).flatten().tolist()) for row in seen[0]]  # y with unit i unspecified
        assert all(s in allowed for s in left_out) and len({frozenset(s) for s in left_out}) > 1
    with pytest.raises(ConfigError, match="coind_unit"):
        TrainingObjective(parts, coind_weight=1.0, coind_unit="column")


def test_coind_training_logs_its_penalty_and_needs_a_partial_conditioner(tiny_cfg, tmp_path):
    from gmmcond.engine.trainer import train
    from gmmcond.io import read_metrics

    train(tiny_cfg("conditioner.attr_dropout=0.3", "train.coind_weight=0.5", "train.log_every=1"), tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["coind"] >= 0 for r in rows) and all(r["loss"] >= r["diffusion"] for r in rows)
    with pytest.raises(ConfigError, match="needs conditioner.attr_dropout > 0"):
        train(tiny_cfg("train.coind_weight=0.5"), tmp_path / "plain")


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
