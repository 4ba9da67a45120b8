"""Post-hoc EMA (EDM2): the power-function profile's closed forms against scipy, the tracks' update against its
telescoped weights, the least-squares reconstruction exact where a snapshot holds the profile, and the tracks
saved, resumed exactly and loaded as a run's weights."""
import numpy as np
import pytest
import torch
from scipy import integrate

from gmmcond.config import load_config
from gmmcond.engine.posthoc_ema import (PowerEMA, gamma_of_sigma_rel, profile_dot, profile_fit,
                                        read_snapshots, reconstruct, sigma_rel_of_gamma)
from gmmcond.engine.trainer import train
from gmmcond.errors import CheckpointError, ConfigError, RunError
from gmmcond.io import load_checkpoint, read_safetensors
from gmmcond.modeling.runs import load_run


def test_sigma_rel_and_gamma_invert_each_other_at_edm2s_values():
    # EDM2 (Karras et al. 2024, Sec. 3.1) keeps sigma_rel 0.05 and 0.10: gamma 16.97 and 6.94
    assert gamma_of_sigma_rel(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of_sigma_rel(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of_gamma(gamma_of_sigma_rel(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.3])
def test_a_sigma_rel_no_profile_has_is_a_config_error(sigma_rel):
    with pytest.raises(ConfigError, match=r"must lie in \(0, 0.2887\)"):
        gamma_of_sigma_rel(sigma_rel)


def test_sigma_rel_is_the_profiles_relative_standard_deviation():
    """The definition, by quadrature: the std of tau under p(tau) = (g + 1) tau^g / t^(g + 1), over the length t."""
    gamma, t = 6.94, 3.0
    p = lambda tau, k: tau ** k * (gamma + 1) * tau ** gamma / t ** (gamma + 1)  # noqa: E731
    mean, second = (integrate.quad(p, 0, t, args=(k,))[0] for k in (1, 2))
    assert np.sqrt(second - mean ** 2) / t == pytest.approx(sigma_rel_of_gamma(gamma), rel=1e-9)


@pytest.mark.parametrize("t_a, g_a, t_b, g_b", [(1000, 16.97, 1000, 6.94), (500, 6.94, 2000, 16.97),
                                                 (2000, 3.0, 700, 0.5), (6000, 6.94, 6000, 6.94)])
def test_the_profile_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    p = lambda tau, t, g: (g + 1) * tau ** g / t ** (g + 1)  # noqa: E731
    expected = integrate.quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, min(t_a, t_b), epsabs=0,
                              epsrel=1e-12, limit=200)[0]
    assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(expected, rel=1e-9)


def test_a_profile_a_snapshot_holds_is_reconstructed_as_that_snapshot():
    gammas = [gamma_of_sigma_rel(s) for s in (0.05, 0.1)]
    snapshots = [(t, g) for t in (500, 1000, 1500, 2000) for g in gammas]
    for i, (t, g) in enumerate(snapshots):
        np.testing.assert_allclose(profile_fit(snapshots, t, g)[0], np.eye(len(snapshots))[i], atol=1e-8)


def test_the_profile_fits_residual_is_the_l2_distance_by_quadrature():
    gammas = [gamma_of_sigma_rel(s) for s in (0.05, 0.1)]
    snapshots = [(t, g) for t in (2000, 4000, 6000) for g in gammas]
    t_r, g_r = 6000, gamma_of_sigma_rel(0.15)
    x, residual = profile_fit(snapshots, t_r, g_r)
    p = lambda tau, t, g: (g + 1) * tau ** g / t ** (g + 1) * (tau <= t)  # noqa: E731
    gap = lambda tau: (sum(c * p(tau, t, g) for c, (t, g) in zip(x, snapshots)) - p(tau, t_r, g_r)) ** 2  # noqa: E731
    norm = integrate.quad(lambda tau: p(tau, t_r, g_r) ** 2, 0, t_r, epsabs=0, epsrel=1e-12, limit=200)[0]
    pieces = ((0, 2000), (2000, 4000), (4000, 6000))  # the profiles' kinks at the snapshot steps
    distance = sum(integrate.quad(gap, a, b, epsabs=0, epsrel=1e-10, limit=200)[0] for a, b in pieces)
    assert 0.01 < residual < 0.5 and residual == pytest.approx(np.sqrt(distance / norm), rel=1e-6)


def test_the_tracks_average_with_the_telescoped_power_weights():
    """beta_t = (1 - 1/t)^(g + 1) telescopes: after T updates theta_hat = sum_t (t^(g+1) - (t-1)^(g+1)) / T^(g+1)
    theta_t, a discrete tau^g profile."""
    model = torch.nn.Linear(3, 1, bias=False).double()
    tracks = PowerEMA(model, [0.05, 0.1])
    values = torch.randn(40, 3, dtype=torch.float64)
    for row in values:
        model.weight.data.copy_(row[None])
        tracks.update()
    steps = np.arange(1, 41, dtype=np.float64)
    for gamma, track in zip(tracks.gammas, tracks.tracks):
        w = (steps ** (gamma + 1) - (steps - 1) ** (gamma + 1)) / 40.0 ** (gamma + 1)
        torch.testing.assert_close(track[0][0], (torch.from_numpy(w)[:, None] * values).sum(0), rtol=1e-10, atol=1e-12)


def test_the_training_emas_profile_is_k_diffusions_ema_warmup():
    """The weights EMAWarmup gives each step's parameters, read off k-diffusion's own schedule and the trainer's
    update on impulses (the parameters equal to 1 at one step and 0 at the others)."""
    import k_diffusion as K

    from gmmcond.engine.posthoc_ema import ema_warmup_profile, ema_warmup_sigma_rel

    steps, power, max_value = 60, 0.75, 0.95  # the cap reached at step 54
    sched = K.utils.EMAWarmup(power=power, max_value=max_value)
    avg, live = torch.zeros(steps, dtype=torch.float64), torch.zeros(steps, dtype=torch.float64)
    for s in range(steps):
        live.zero_()[s] = 1.0
        avg.lerp_(live, 1 - sched.get_value())
        sched.step()
    np.testing.assert_allclose(ema_warmup_profile(power, max_value, steps), avg.numpy(), rtol=1e-12, atol=1e-15)
    t = np.arange(1, steps + 1)
    w = avg.numpy()
    assert ema_warmup_sigma_rel(power, max_value, steps) == pytest.approx(
        np.sqrt(np.average(t ** 2, weights=w) - np.average(t, weights=w) ** 2) / steps, rel=1e-9)


class Killed(Exception):
    pass


POSTHOC = ("train.steps=6", "train.checkpoint_every=2", "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=3")


def test_a_run_saves_its_tracks_resumes_them_exactly_and_loads_a_chosen_length(tmp_path):
    cfg = load_config("shapes_tiny", POSTHOC)
    train(cfg, tmp_path / "full")

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # after the snapshot at 3, with the last checkpoint at 4

    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", on_step=kill_at_5)
    train(cfg, tmp_path / "cut", resume=True)
    for step in (3, 6):
        full = read_safetensors(tmp_path / "full" / "posthoc_ema" / f"{step:07d}.safetensors", CheckpointError)[0]
        cut = read_safetensors(tmp_path / "cut" / "posthoc_ema" / f"{step:07d}.safetensors", CheckpointError)[0]
        assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full), step

    # a length one track holds, at the last snapshot: that track, and load_run samples with it
    state, facts = reconstruct(tmp_path / "full", 0.1)
    track = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000006.pt")["posthoc_ema"]["tracks"][1]
    assert facts["step"] == 6 and facts["profile_residual"] < 1e-6
    for name, value in track.items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-7)
    run = load_run(tmp_path / "full", weights="posthoc:0.1")
    assert run.step == 6
    for name, value in track.items():
        torch.testing.assert_close(dict(run.parts.denoiser.inner_model.named_parameters())[name], value,
                                   rtol=1e-5, atol=1e-7)
    # another length: a combination of the four snapshots, its profile fitted less closely
    between, facts = reconstruct(tmp_path / "full", 0.07)
    assert len(facts["coefficients"]) == 4 and 0 < facts["profile_residual"] < 1
    assert len(read_snapshots(tmp_path / "full", up_to=3)) == 2


def test_posthoc_settings_that_cannot_work_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.posthoc_ema: a post-hoc EMA sigma_rel must lie in"):
        load_config("shapes_tiny", ["train.posthoc_ema=[0.5]"])
    with pytest.raises(ConfigError, match="train.posthoc_ema: must be a list of distinct numbers"):
        load_config("shapes_tiny", ["train.posthoc_ema=[0.1,0.1]"])
    train(load_config("shapes_tiny"), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="holds no post-hoc EMA snapshots: train with train.posthoc_ema"):
        load_run(tmp_path / "plain", weights="posthoc:0.1")
    with pytest.raises(RunError, match="'ema', 'live' or 'posthoc:SIGMA_REL'"):
        load_run(tmp_path / "plain", weights="posthoc:wide")
    with pytest.raises(RunError, match="cannot change train.posthoc_ema"):
        train(load_config("shapes_tiny", ["train.steps=4", "train.posthoc_ema=[0.1]"]), tmp_path / "plain", resume=True)


def test_ema_lengths_scores_each_length_once_beside_the_training_ema(tmp_path, monkeypatch):
    from gmmcond.eval import evaluate
    from gmmcond.experiments import benchmarks

    run = tmp_path / "run"
    train(load_config("shapes_tiny", POSTHOC), run)
    weights = []
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, settings, size, **kw: weights.append(kw["weights"]) or real(
        run, {"steps": 2}, evaluate.EvalSize(n=8, sets=0, memorisation=0), **kw))
    first = benchmarks.ema_lengths([run], [0.07, 0.1], n=8, log=lambda *_: None)
    again = benchmarks.ema_lengths([run], [0.07, 0.1], n=8, log=lambda *_: None)  # read back, not evaluated again
    assert weights == ["ema", "posthoc:0.07", "posthoc:0.1"] and again == first
    assert list(first["settings"]) == ["training EMA (EMAWarmup)", "post-hoc EMA, sigma_rel 0.07",
                                       "post-hoc EMA, sigma_rel 0.1"]
    assert all(0 <= st["all_attributes_correct"]["mean"] <= 1 for st in first["settings"].values())
    assert 0 < first["training_ema_sigma_rel"] < 0.2887  # where the run's own EMA sits among the lengths
    residual = first["settings"]["post-hoc EMA, sigma_rel 0.1"]["profile_residual"]
    assert residual["mean"] < 1e-6 and first["settings"]["post-hoc EMA, sigma_rel 0.07"]["profile_residual"]["mean"] > 0
