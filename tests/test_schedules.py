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
