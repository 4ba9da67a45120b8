import torch

from gmmcond.registry import SCHEDULES


def test_vp_schedules_map_alpha_bar_to_sigma():
    for node, betas in ((
        {"type": "vp_linear"}, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)), (
        {"type": "vp_constant", "T": 100, "beta": 0.05}, torch.full((100,), 0.05, dtype=torch.float64)),
    ):
        sched = SCHEDULES.build(node)
        abar = torch.cumprod(1 - betas, 0)
        want = ((1 - abar) / abar).sqrt()  # x_t / sqrt(abar_t) = x0 + sigma_t eps
        assert torch.allclose(sched.all_sigmas.double(), want, rtol=1e-5)
        sigmas = sched.sigmas(10)
        assert len(sigmas) == 11 and sigmas[-1] == 0 and (sigmas[:-1].diff() < 0).all()
        assert torch.isclose(sigmas[0], want[-1].float()) and torch.isclose(sigmas[-2], want[0].float())
        assert torch.equal(sched.sigmas(10_000)[:-1], sched.all_sigmas.flip(0))  # never more than the T levels


def test_vp_training_draws_the_discrete_levels_uniformly():
    sched = SCHEDULES.build({"type": "vp_constant", "T": 10})
    draws = sched.sample_sigmas(20000, torch.Generator().manual_seed(0))
    counts = torch.stack([(draws == s).sum() for s in sched.all_sigmas])
    assert counts.sum() == 20000 and ((counts - 2000).abs() < 200).all()


def test_karras_schedule_density_and_sigmas():
    sched = SCHEDULES.build({"type": "karras", "loc": -1.2, "scale": 1.2})
    log_sigma = sched.sample_sigmas(50000, torch.Generator().manual_seed(0)).log()
    assert abs(log_sigma.mean() + 1.2) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03
    sigmas = sched.sigmas(20)
    assert abs(sigmas[0].item() - 80.0) < 1e-3 and abs(sigmas[-2].item() - 0.01) < 1e-6 and sigmas[-1] == 0


def test_soft_min_snr_tilt_draws_the_lognormal_times_the_weighting():
    """The tilted draws follow p(sigma) w(sigma) / Z exactly: a KS test against that CDF, integrated by scipy,
    with w k-diffusion's own soft-min-SNR weighting."""
    import math

    import k_diffusion as K
    import numpy as np
    from scipy import integrate, stats

    sched = SCHEDULES.build({"type": "karras", "tilt": "soft_min_snr", "tilt_sigma_data": 0.5})
    log_sigma = sched.sample_sigmas(20000, torch.Generator().manual_seed(0)).log().double().numpy()
    weighting = K.layers.Denoiser(torch.nn.Identity(), sigma_data=0.5, weighting="soft-min-snr").weighting

    def density(u):  # in log sigma: the log-normal times the weighting
        return stats.norm.pdf(u, -1.2, 1.2) * float(weighting(torch.tensor(math.exp(u), dtype=torch.float64)))

    z = integrate.quad(density, -12, 10)[0]
    grid = np.linspace(-8, 6, 1401)
    cdf_grid = np.concatenate([[0], np.cumsum([integrate.quad(density, a, b)[0] for a, b in zip(grid[:-1], grid[1:])])]) / z
    result = stats.kstest(log_sigma, lambda u: np.interp(u, grid, cdf_grid))
    assert result.pvalue > 0.01, result
    plain = stats.kstest(SCHEDULES.build({"type": "karras"}).sample_sigmas(20000, torch.Generator().manual_seed(0)).log()
                         .double().numpy(), lambda u: np.interp(u, grid, cdf_grid))
    assert plain.pvalue < 1e-6  # the untilted log-normal is told apart: the test can fail
    again = sched.sample_sigmas(20000, torch.Generator().manual_seed(0)).log().double().numpy()
    assert np.array_equal(log_sigma, again)  # seeded draws repeat


def test_tilt_config_errors_name_the_fix():
    import pytest

    from gmmcond.config import load_config
    from gmmcond.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule.tilt=soft_min_snr needs denoiser.sigma_data as a number"):
        load_config("shapes", ["schedule.tilt=soft_min_snr", "denoiser.loss=karras"])  # the recipe measures it
    with pytest.raises(ConfigError, match="set denoiser.loss=karras"):
        load_config("shapes", ["denoiser.sigma_data=0.5", "schedule.tilt=soft_min_snr"])
    with pytest.raises(ConfigError, match="must equal denoiser.sigma_data"):
        load_config("shapes", ["denoiser.sigma_data=0.5", "schedule.tilt=soft_min_snr", "denoiser.loss=karras",
                               "schedule.tilt_sigma_data=1.0"])
    with pytest.raises(ConfigError, match="schedule.tilt must be one of none, soft_min_snr"):
        SCHEDULES.build({"type": "karras", "tilt": "snr"})
    assert load_config("shapes", ["denoiser.sigma_data=0.5", "schedule.tilt=soft_min_snr",
                                  "denoiser.loss=karras"])["schedule"]["tilt"] == "soft_min_snr"
