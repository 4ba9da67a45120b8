"""The peer (diffusers' UNet2DModel as diffusers' text-to-image example trains it): its weighting against the closed
form, its training and sampler, and its scoring by the project's own protocol."""
import pytest
import torch

from gmmcond.errors import ConfigError
from gmmcond.experiments.peer import PeerRecipe, PeerSampler, PeerUNet, min_snr_weights, train_peer, train_scheduler

TINY = PeerRecipe(block_out_channels=(8, 16), layers_per_block=1, attention=(False, True), attention_head_dim=8,
                  batch_size=8, sample_steps=3)


def test_min_snr_weights_are_the_closed_form_on_the_cosine_schedule():
    scheduler = train_scheduler(PeerRecipe())
    t = torch.tensor([0, 10, 250, 500, 999])
    abar = scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)  # alpha^2 / sigma^2
    for prediction, denominator in (("v_prediction", snr + 1), ("epsilon", snr)):
        got = min_snr_weights(scheduler, t, 5.0, prediction).double()
        assert torch.allclose(got, torch.minimum(snr, torch.full_like(snr, 5.0)) / denominator, rtol=1e-5)
    assert PeerRecipe().model_calls == 60 and PeerRecipe(cfg_scale=1.0).model_calls == 30
    with pytest.raises(ConfigError, match="attention_head_dim 64 must divide the 16 channels"):
        PeerUNet(PeerRecipe(block_out_channels=(8, 16), attention=(False, True)), 11, 16)


def test_the_peer_recipe_takes_field_overrides_as_its_defaults_types_and_names_a_wrong_one():
    got = PeerRecipe.from_overrides(["lr=1e-3", "attention=[false,false,true]", "betas=[0.9, 0.95]", "precision=fp32"])
    assert got == PeerRecipe(lr=1e-3, attention=(False, False, True), betas=(0.9, 0.95), precision="fp32")
    assert PeerRecipe.from_overrides([]) == PeerRecipe()
    with pytest.raises(ConfigError, match=r"peer.lrr: unknown key; did you mean 'lr'\? Valid keys: .*, lr, "):
        PeerRecipe.from_overrides(["lrr=1"])
    with pytest.raises(ConfigError, match="peer.batch_size: expected int, got 'big'"):
        PeerRecipe.from_overrides(["batch_size=big"])
    with pytest.raises(ConfigError, match="override 'lr' must look like dotted.path=value"):
        PeerRecipe.from_overrides(["lr"])


@pytest.fixture(scope="module")
def tiny_peer():
    from gmmcond.config import load_config
    from gmmcond.registry import DATASETS

    cfg = load_config("shapes_tiny")
    model, trained = train_peer(TINY, DATASETS.build(cfg["dataset"]), 0.01, seed=0, progress=False)
    return cfg, model, trained


def test_the_peer_trains_for_its_minutes_and_samples_by_seed_with_guidance(tiny_peer):
    cfg, model, trained = tiny_peer
    assert trained["train_steps"] >= 1 and trained["minutes"] >= 0.01 and trained["loss_last100"] > 0
    assert trained["params"] == sum(p.numel() for p in model.parameters())
    attrs = torch.zeros(5, model.attr_proj.in_features)
    attrs[:, 0] = 1
    sampler = PeerSampler(model, TINY, seed=3, batch=2, progress=False)
    a, b = sampler(attrs, 3, "a"), sampler(attrs, 3, "b")
    assert a.shape == (5, 3, cfg["dataset"]["size"], cfg["dataset"]["size"]) and torch.equal(a, b)
    assert a.abs().max() <= 1 and not torch.equal(a, sampler(attrs, 4, "c"))
    unguided = PeerSampler(model, PeerRecipe(**{**TINY.__dict__, "cfg_scale": 1.0}), seed=3, batch=2, progress=False)
    assert not torch.equal(a, unguided(attrs, 3, "d"))  # guidance changes the samples
    assert sampler.paired_latents(torch.arange(3)) is None


def test_the_peer_is_scored_by_the_projects_own_protocol(tiny_peer):
    from gmmcond.eval.evaluate import EvalSize, eval_summary, evaluate_sampler

    cfg, model, _ = tiny_peer
    scored = evaluate_sampler(PeerSampler(model, TINY, progress=False), cfg["dataset"],
                              EvalSize(n=8, sets=1, per_set=8, memorisation=4, batch=8), progress=False)
    summary = eval_summary(scored.result)
    assert 0 <= summary["all_attributes_correct"] <= 1 and 0 <= summary["defect_rate"] <= 1
    assert "set_coverage" in summary and scored.images.shape[0] == 8 and scored.result["memorisation"]["n"] == 4


def test_the_peer_trains_a_given_number_of_steps_and_times_them():
    from gmmcond.config import load_config
    from gmmcond.registry import DATASETS

    data = DATASETS.build(load_config("shapes_tiny")["dataset"])
    _, trained = train_peer(TINY, data, None, seed=0, steps=4, progress=False)
    assert trained["train_steps"] == 4 and trained["sec_per_step_median"] > 0 and trained["sec_per_step_steady"] > 0
    with pytest.raises(ValueError, match="minutes or steps"):
        train_peer(TINY, data, None, seed=0)


def test_a_recipes_step_time_now_is_timed_on_a_throwaway_run(tiny_cfg, tmp_path, monkeypatch):
    """What a calibrated peer is measured against: the recipe's own steps, trained from scratch here."""
    from gmmcond.experiments.benchmarks import step_seconds_now

    monkeypatch.chdir(tmp_path)
    seconds = step_seconds_now(tiny_cfg(), steps=6)
    assert 0 < seconds < 60 and list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_calibrated_peer_trains_the_runs_steps_scaled_by_the_step_times_and_records_them(tiny_run, tmp_path,
                                                                                            monkeypatch):
    """--calibrate: the peer gets round(run steps x recipe step time / peer step time) steps, both times measured
    just before it trains; the timings land beside its scores, and a second call reads the result back."""
    import gmmcond.experiments.benchmarks as benchmarks
    import gmmcond.experiments.peer as peer

    monkeypatch.setattr(peer, "CALIBRATION_STEPS", {"run": 4, "peer": 4})
    monkeypatch.setattr(benchmarks, "step_seconds_now", lambda cfg, steps: 0.25)  # the recipe's step, timed
    result = peer.peer_vs_runs([tiny_run], TINY, calibrate=True, n=8, out=tmp_path / "bench", log=lambda *a: None)
    gm, theirs = (s["per_seed"][0] for s in result["settings"].values())
    run_steps, peer_s = gm["train_steps"], theirs["calibrated_peer_sec_per_step"]
    assert theirs["calibrated_run_sec_per_step"] == 0.25 and peer_s > 0
    assert theirs["train_steps"] == theirs["calibrated_peer_steps"] == round(run_steps * 0.25 / peer_s)
    assert theirs["calibrated_run_minutes_now"] == run_steps * 0.25 / 60

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished seed was trained again")

    monkeypatch.setattr(peer, "train_peer", must_not_train)
    again = peer.peer_vs_runs([tiny_run], TINY, calibrate=True, n=8, out=tmp_path / "bench", log=lambda *a: None)
    assert again == result
