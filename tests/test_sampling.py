import json

import k_diffusion as K
import pytest
import torch

from entry import run_captured
from gmmcond.engine.trainer import train
from gmmcond.modeling.runs import load_run
from gmmcond.registry import SAMPLERS
from gmmcond.sampling import CFGDenoiser, sample, sample_x0_reproject
from gmmcond.sampling.testbed import GaussianMixtureDenoiser, sliced_wasserstein
from gmmcond.config import load_config
from gmmcond.modeling.build import build
from gmmcond.sampling import HeadGuidedDenoiser


class ToyDenoiser(torch.nn.Module):
    """A smooth nonlinear denoiser, enough to tell samplers apart."""

    def forward(self, x, sigma, shift=0.0):
        s = K.utils.append_dims(sigma, x.ndim)
        return torch.tanh(x / (1 + s ** 2)) * 0.8 + shift


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_renoise_0_equals_k_diffusion_euler(dtype, tol):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype) * 10
    sigmas = K.sampling.get_sigmas_karras(12, 0.01, 10.0).to(dtype)
    ours = sample_x0_reproject(ToyDenoiser(), x, sigmas, renoise=0.0, disable=True)
    ref = K.sampling.sample_euler(ToyDenoiser(), x, sigmas, disable=True)
    assert (ours - ref).abs().max().item() < tol


def test_renoise_1_equals_euler_ancestral_with_huge_eta():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    sigmas = K.sampling.get_sigmas_karras(12, 0.01, 10.0).double()

    def noise():
        gen = torch.Generator().manual_seed(5)
        return lambda s, t: torch.randn(x.shape, generator=gen, dtype=x.dtype)

    ours = sample_x0_reproject(ToyDenoiser(), x, sigmas, renoise=1.0, noise_sampler=noise(), disable=True)
    ref = K.sampling.sample_euler_ancestral(ToyDenoiser(), x, sigmas, eta=1e9, noise_sampler=noise(), disable=True)
    assert (ours - ref).abs().max().item() < 1e-10


def test_callback_keys_extra_args_and_last_step_returns_denoised():
    x = torch.randn(2, 3, 4, 4) * 5
    sigmas = K.sampling.get_sigmas_karras(5, 0.1, 5.0)
    seen = []
    out = sample_x0_reproject(ToyDenoiser(), x, sigmas, extra_args={"shift": 0.25}, callback=seen.append, disable=True)
    assert [set(c) for c in seen] == [{"x", "i", "sigma", "sigma_hat", "denoised"}] * 5
    assert [c["i"] for c in seen] == list(range(5))
    assert torch.equal(out, seen[-1]["denoised"])  # the last step (sigma -> 0) returns the prediction
    assert torch.allclose(seen[-1]["denoised"], ToyDenoiser()(seen[-1]["x"], sigmas[-2].expand(2), shift=0.25))


def test_sampler_runs_through_the_registry_by_name():
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = K.sampling.get_sigmas_karras(6, 0.1, 5.0)
    a = sample("x0_reproject", ToyDenoiser(), noise, sigmas)
    torch.manual_seed(0)
    b = sample({"type": "x0_reproject", "renoise": 0.0}, ToyDenoiser(), noise, sigmas)
    assert torch.allclose(b, K.sampling.sample_euler(ToyDenoiser(), noise * sigmas[0], sigmas, disable=True), atol=1e-5)
    assert a.shape == noise.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_denoises_a_toy_model(name):
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    sigmas = K.sampling.get_sigmas_karras(4, 0.1, 5.0)
    out = sample(name, ToyDenoiser(), noise, sigmas)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert out.abs().max() < 1.5  # near the denoiser's range (|0.8 tanh| < 1; multistep solvers overshoot a little)
    assert (out - noise * sigmas[0]).abs().mean() > 1.0  # and far from the starting noise


def test_x0_reproject_is_exact_at_renoise_0_on_the_testbed():
    bed = GaussianMixtureDenoiser.default(d=2)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    exact_a, exact_b = bed.sample(n, gen), bed.sample(n, gen)
    floor = sliced_wasserstein(exact_a, exact_b)
    sigmas = K.sampling.get_sigmas_karras(100, 0.002, 80.0).double()
    x = sample_x0_reproject(bed, torch.randn(n, 2, generator=gen, dtype=torch.float64) * 80, sigmas, renoise=0.0, disable=True)
    assert sliced_wasserstein(x, exact_a) < 2 * floor


def test_renoise_1_sharpens_toward_the_heaviest_mode_and_shrinks_spread():
    bed = GaussianMixtureDenoiser.default(d=2)
    gen = torch.Generator().manual_seed(0)
    n = 4000
    sigmas = K.sampling.get_sigmas_karras(100, 0.002, 80.0).double()
    x = sample_x0_reproject(bed, torch.randn(n, 2, generator=gen, dtype=torch.float64) * 80, sigmas, renoise=1.0, disable=True)
    weights, spread = bed.mode_stats(x)
    true_weights, true_spread = bed.mode_stats(bed.sample(n, gen))
    assert weights[0] > true_weights[0] + 0.03  # the heaviest mode (w = 0.5) gains mass
    assert (spread < 0.8 * true_spread).all()  # every mode is narrower than the truth


def test_cfg_at_scale_1_is_the_conditional_model():
    bed = GaussianMixtureDenoiser.default(d=2)
    x, sigma = torch.randn(5, 2, dtype=torch.float64) * 2, torch.full((5,), 1.5, dtype=torch.float64)
    cond = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).double()
    guided = CFGDenoiser(bed, 1.0, bed.weights, cond_key="class_weights")(x, sigma, class_weights=cond)
    assert torch.allclose(guided, bed(x, sigma, class_weights=cond), atol=1e-12)


class CallLog(torch.nn.Module):
    """The testbed, recording the batch size of every forward."""

    def __init__(self, bed):
        super().__init__()
        self.bed, self.batches = bed, []

    def forward(self, x, sigma, **kwargs):
        self.batches.append(len(x))
        return self.bed(x, sigma, **kwargs)


def test_cfg_in_an_interval_guides_inside_it_and_is_the_conditional_model_in_one_forward_outside():
    bed = GaussianMixtureDenoiser.default(d=2)
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    cond = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0, 2]), 3).double()
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0, 9.0], dtype=torch.float64)
    always = CFGDenoiser(bed, 3.0, bed.weights, cond_key="class_weights")(x, sigma, class_weights=cond)
    plain = bed(x, sigma, class_weights=cond)
    logged = CallLog(bed)
    mixed = CFGDenoiser(logged, 3.0, bed.weights, cond_key="class_weights", interval=(0.5, 5.0))(x, sigma, class_weights=cond)
    inside = torch.tensor([False, False, True, True, True, False])  # lo < sigma <= hi
    assert torch.equal(mixed[inside], always[inside]) and torch.allclose(mixed[~inside], plain[~inside], atol=1e-12)
    assert not torch.allclose(always, plain)  # the guidance moved something
    logged.batches.clear()
    outside = CFGDenoiser(logged, 3.0, bed.weights, cond_key="class_weights", interval=(10.0, 80.0))
    assert torch.equal(outside(x, sigma, class_weights=cond), plain) and logged.batches == [6]  # no null branch


def test_sampling_with_cfg_in_an_interval_spans_plain_and_guided_sampling():
    bed = GaussianMixtureDenoiser.default(d=2)
    cond = torch.nn.functional.one_hot(torch.full((64,), 1), 3).double()
    sigmas = K.sampling.get_sigmas_karras(20, 0.002, 80.0).double()
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(scale, interval=None):
        model = CFGDenoiser(bed, scale, bed.weights, cond_key="class_weights", interval=interval)
        return sample("euler", model, noise, sigmas, extra_args={"class_weights": cond})

    assert torch.equal(run(3.0, (0.0, 1e3)), run(3.0))  # every sampling sigma inside: CFG throughout
    assert torch.allclose(run(3.0, (1e3, 1e4)), run(1.0), atol=1e-12)  # none inside: the conditional model
    part = run(3.0, (0.3, 5.0))
    assert not torch.allclose(part, run(3.0)) and not torch.allclose(part, run(1.0))


def test_cfg_raises_target_posterior_and_lowers_spread_on_the_testbed():
    bed = GaussianMixtureDenoiser.default(d=2)
    n, target = 2000, 1
    cond = torch.nn.functional.one_hot(torch.full((n,), target), 3).double()
    sigmas = K.sampling.get_sigmas_karras(50, 0.002, 80.0).double()
    results = []
    for scale in (1.0, 2.0, 4.0):
        model = CFGDenoiser(bed, scale, bed.weights, cond_key="class_weights")
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x = sample("euler", model, noise, sigmas, extra_args={"class_weights": cond})
        post = bed.log_posterior(x, torch.full((n,), 0.05)).exp()[:, target].mean().item()
        spread = (x - x.mean(0)).pow(2).sum(1).mean().sqrt().item()
        results.append((post, spread))
    posts, spreads = zip(*results)
    assert posts[0] < posts[1] < posts[2] and spreads[0] > spreads[1] > spreads[2]


def test_a_seeded_generator_makes_stochastic_samplers_reproducible():
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = K.sampling.get_sigmas_karras(6, 0.1, 5.0)
    runs = [sample(name, ToyDenoiser(), noise, sigmas, generator=torch.Generator().manual_seed(s))
            for name in ("x0_reproject", "euler_ancestral") for s in (3, 3, 4)]
    for a, b, c in (runs[:3], runs[3:]):
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_seeded_sample_leaves_the_global_rng_as_it_was(name):
    """euler, heun and dpm_2 draw their churn noise with ``randn_like`` (even at s_churn 0): with a generator they
    draw it from a forked stream, so a training grid cannot move the training's noise stream; and with churn on,
    the images still repeat for one seed and differ between seeds."""
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    sigmas = K.sampling.get_sigmas_karras(4, 0.1, 5.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sample(name, ToyDenoiser(), noise, sigmas, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), before)
    if name in ("euler", "heun", "dpm_2"):
        churned = {"type": name, "s_churn": 1.0}
        a, b, c = (sample(churned, ToyDenoiser(), noise, sigmas, generator=torch.Generator().manual_seed(s))
                   for s in (5, 5, 6))
        assert torch.equal(a, b) and not torch.equal(a, c)


class ToyEps(torch.nn.Module):
    """A stand-in for an eps- or v-predicting network: any smooth function of (x, t)."""

    def forward(self, x, t, **kwargs):
        return torch.tanh(x) * 0.5 + 0.01 * t.view(-1, *([1] * (x.ndim - 1))).float() / 1000

    def apply_model(self, x, t, **kwargs):  # the CompVis-style entry point the external wrappers call
        return self(x, t)


@pytest.mark.parametrize("wrapper", ["DiscreteEpsDDPMDenoiser", "VDenoiser"])
def test_x0_reproject_runs_on_k_diffusion_external_wrappers(wrapper):
    if wrapper == "VDenoiser":
        model = K.external.VDenoiser(ToyEps())
        sigmas = K.sampling.get_sigmas_karras(8, 0.05, 10.0)
    else:
        alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        model = K.external.DiscreteEpsDDPMDenoiser(ToyEps(), alphas_cumprod, quantize=True)
        sigmas = model.get_sigmas(8)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    ours = sample_x0_reproject(model, x, sigmas, renoise=0.0, disable=True)
    assert torch.allclose(ours, K.sampling.sample_euler(model, x, sigmas, disable=True), atol=1e-4)
    out = sample_x0_reproject(model, x, sigmas, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_composed_guidance_is_exact_on_the_testbed():
    from gmmcond.sampling import ComposedGuidanceDenoiser

    gm = GaussianMixtureDenoiser.default()
    gen = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 2, torch.full((6,), 0.8, dtype=torch.float64)
    onehot = torch.eye(3, dtype=torch.float64)
    conds = torch.stack([onehot[0].expand(6, 3), onehot[2].expand(6, 3)], 1)  # [B, T=2, C]
    weights = [1.5, -0.5]
    composed = ComposedGuidanceDenoiser(gm, weights, gm.weights, cond_key="class_weights")(x, sigma, class_weights=conds)
    d_null, d0, d2 = gm(x, sigma), gm(x, sigma, onehot[0].expand(6, 3)), gm(x, sigma, onehot[2].expand(6, 3))
    torch.testing.assert_close(composed, d_null + 1.5 * (d0 - d_null) - 0.5 * (d2 - d_null), rtol=1e-12, atol=1e-12)
    # one term of weight s is classifier-free guidance at scale s; weight 1 is the exact conditional denoiser
    one = ComposedGuidanceDenoiser(gm, [2.0], gm.weights, cond_key="class_weights")(x, sigma, class_weights=conds[:, :1])
    cfg = CFGDenoiser(gm, 2.0, gm.weights, cond_key="class_weights")(x, sigma, class_weights=onehot[0].expand(6, 3))
    torch.testing.assert_close(one, cfg, rtol=1e-12, atol=1e-12)
    exact = ComposedGuidanceDenoiser(gm, [1.0], gm.weights, cond_key="class_weights")(x, sigma, class_weights=conds[:, :1])
    torch.testing.assert_close(exact, d0, rtol=1e-12, atol=1e-12)


def test_a_negative_composed_weight_pushes_samples_away_from_a_mode():
    from gmmcond.sampling import ComposedGuidanceDenoiser

    gm = GaussianMixtureDenoiser.default()
    sigmas = K.sampling.get_sigmas_karras(30, 0.01, 20.0, device="cpu").double()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    away = torch.eye(3, dtype=torch.float64)[0].expand(2000, 1, 3)
    fractions = {}
    for w in (0.0, -1.0):
        model = ComposedGuidanceDenoiser(gm, [w], gm.weights, cond_key="class_weights")
        out = sample("euler", model, noise, sigmas, extra_args={"class_weights": away})
        fractions[w] = (gm.assign(out) == 0).double().mean().item()
    assert fractions[0.0] > 0.4 and fractions[-1.0] < 0.5 * fractions[0.0], fractions


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


def test_seeded_dpm_fast_and_adaptive_repeat_and_depend_on_the_seed():
    model = lambda x, sigma, **kw: x / (1 + sigma[:, None] ** 2)  # exact denoiser of N(0, I)
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for node in ({"type": "dpm_fast", "eta": 1.0}, {"type": "dpm_adaptive", "eta": 1.0}):
        run = lambda seed: sample(node, model, noise, sigmas, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(1), run(1))
        assert not torch.equal(run(1), run(2))


def test_sample_cli_writes_grids_lists_valid_attributes_and_exports(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("head=bottleneck_attrs"), run)
    bad = run_sample("--run", run, "--attrs", "circle,purple")
    assert bad.returncode == 2
    assert "unknown attribute(s) ['purple'] in 'circle,purple'; valid attributes: circle, square, triangle, red, green, blue" in bad.stderr
    for mode in ("latents", "fixed-latent", "x0-strip"):
        interval = ("--cfg-interval", 0.1, 5.0) if mode == "x0-strip" else ()
        ok = run_sample("--run", run, "--attrs", "circle,red", "--n", 2, "--steps", 3, "--mode", mode, "--head-scale", 1.0,
                        "--cfg-scale", 2.0, *interval, "--export", tmp_path / "ema.safetensors")  # head guidance and CFG
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert (run / "samples" / f"{mode}_circle-red.png").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert json.loads(f.metadata()["config"])["head"]["type"] == "bottleneck_attrs"
        parts = load_run(run).parts
        expected = set(parts.denoiser.inner_model.state_dict()) | {f"head.{k}" for k in parts.head.state_dict()}
        assert set(f.keys()) == expected


def test_sample_cli_leaves_attributes_open_and_composes_on_an_attr_dropout_run(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("conditioner.attr_dropout=0.25"), run)
    assert load_run(run).parts.conditioner.partial
    for args in (("--attrs", "circle,~red", "--open", "model"), ("--compose", "circle:2,red:-1")):
        ok = run_sample("--run", run, *args, "--n", 2, "--steps", 3)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "note:" not in ok.stdout
    assert "'circle,~red': left open (hidden by the model, trained with attr_dropout): green, blue, large" in \
        run_sample("--run", run, "--attrs", "circle,~red", "--open", "model", "--n", 2, "--steps", 3).stdout
    assert (run / "samples" / "latents_circle-red.png").exists() and (run / "samples" / "latents_circle-2-red-1.png").exists()
    bad = run_sample("--run", run, "--compose", "circle:2,purple:1")
    assert bad.returncode == 2 and "purple" in bad.stderr and "Traceback" not in bad.stderr


def test_sample_cli_says_what_an_open_attribute_meant(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    ok = run_sample("--run", run, "--attrs", "circle,~red", "--n", 2, "--steps", 3, "--open", "absent")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "'circle,~red': open attributes taken as absent (open=absent): green, blue, large, left" in ok.stdout
    ok = run_sample("--run", run, "--attrs", "circle,~red", "--n", 2, "--steps", 3)  # open=data, the default
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "'circle,~red': open attributes drawn from the data, frequency over 2 samples: green" in ok.stdout


def run_sample(*args):
    return run_captured("sample", *args)
