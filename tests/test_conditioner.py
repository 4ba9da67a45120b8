import numpy as np
import pytest
import torch
from scipy import stats

from gmmcond.errors import ConfigError
from gmmcond.modeling.conditioners import GMMAttrs, NoConditioner
from gmmcond.registry import CONDITIONERS


def make(**kw):
    return CONDITIONERS.build({"type": "gmm_attrs", **kw}, num_attrs=5)


def test_output_shape_and_dim():
    cond = make(dims_per_attr=3)
    out = cond.eval()(torch.ones(4, 5), torch.arange(4))
    assert cond.dim == 5 * 3 + 1 and out.shape == (4, 16)


def test_attributes_mask_their_blocks_and_flag_is_zero():
    cond = make(dims_per_attr=3).eval()
    attrs = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    out = cond(attrs, torch.arange(2))
    blocks = out[:, :-1].view(2, 5, 3)
    assert (blocks[0, [1, 3, 4]] == 0).all() and (blocks[0, [0, 2]] != 0).all()
    assert (blocks[1] == 0).all()
    assert (out[:, -1] == 0).all()


def test_fixed_pairing_is_reproducible_per_index_and_differs_across_indices():
    cond = make().eval()
    attrs = torch.ones(3, 5)
    a = cond(attrs, torch.tensor([7, 8, 7]))
    b = make()  # a fresh module with the same seed
    assert torch.equal(a, cond.eval()(attrs, torch.tensor([7, 8, 7])))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(a, b.eval()(attrs, torch.tensor([7, 8, 7])))
    assert not torch.equal(a, make(seed=1).eval()(attrs, torch.tensor([7, 8, 7])))


def test_resample_pairing_draws_fresh_latents():
    cond = make(pairing="resample").eval()
    attrs, index = torch.ones(2, 5), torch.tensor([3, 3])
    assert not torch.equal(cond(attrs, index), cond(attrs, index))


def mixture_cdf(means, weights, sigma):
    return lambda x: sum(w * stats.norm.cdf(x, m, sigma) for m, w in zip(means, weights))


@pytest.mark.parametrize("means,weights,sigma", [([1.0, 2.0, 3.0], None, 0.3), ([-1.5, 0.0, 1.5], [0.5, 0.2, 0.3], 0.4)])
@pytest.mark.parametrize("pairing", ["fixed", "resample"])
def test_latents_follow_the_configured_gmm(means, weights, sigma, pairing):
    cond = make(means=means, weights=weights, sigma=sigma, pairing=pairing, dims_per_attr=4).eval()
    out = cond(torch.ones(1000, 5), torch.arange(1000))
    z = out[:, :-1].flatten().double().numpy()  # 20000 draws
    w = np.full(len(means), 1 / len(means)) if weights is None else np.array(weights)
    mean = float((w * means).sum())
    var = sigma**2 + float((w * (np.array(means) - mean) ** 2).sum())
    se = np.sqrt(var / len(z))
    assert abs(z.mean() - mean) < 4 * se
    assert abs(z.var() - var) < 4 * var * np.sqrt(2 / len(z)) * 1.5  # var of a mixture: looser than Gaussian
    assert stats.kstest(z, mixture_cdf(means, w, sigma)).pvalue > 1e-3


def test_dropout_sets_flag_and_zeroes_the_latent():
    torch.manual_seed(0)
    cond = make(cond_dropout=0.5).train()
    out = cond(torch.ones(400, 5), torch.arange(400))
    dropped = out[:, -1] == 1
    assert 120 < dropped.sum() < 280
    assert (out[dropped, :-1] == 0).all() and (out[~dropped, :-1] != 0).all()
    assert torch.equal(cond.unconditional(2), torch.cat([torch.zeros(2, 20), torch.ones(2, 1)], 1))
    assert not torch.equal(cond.unconditional(1), cond.eval()(torch.zeros(1, 5), torch.arange(1)))


def test_eval_mode_never_drops():
    cond = make(cond_dropout=0.9).eval()
    assert (cond(torch.ones(100, 5), torch.arange(100))[:, -1] == 0).all()


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="pairing must be one of fixed, resample, constant"):
        make(pairing="sometimes")
    with pytest.raises(ValueError, match="weights has 2 entries but means has 3"):
        make(weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="expects 5 attributes"):
        make().eval()(torch.ones(2, 4), torch.arange(2))


def test_none_conditioner_has_no_dim():
    cond = NoConditioner(num_attrs=3)
    assert cond.dim == 0 and cond(torch.ones(2, 3), torch.arange(2)) is None
    assert isinstance(make(), GMMAttrs)


def test_attr_dropout_zero_is_eq9_exactly_and_positive_adds_known_bits():
    z = GMMAttrs(num_attrs=3).sample_latents(4, torch.Generator().manual_seed(0))
    attrs = torch.tensor([[1.0, 0, 1]] * 4)
    plain, zero = GMMAttrs(num_attrs=3).eval(), GMMAttrs(num_attrs=3, attr_dropout=0.0).eval()
    assert zero.dim == plain.dim == 3 * 4 + 1
    torch.testing.assert_close(zero.encode(attrs, z), plain.encode(attrs, z))
    partial = GMMAttrs(num_attrs=3, attr_dropout=0.3)
    assert partial.dim == 3 * 4 + 3 + 1
    known = torch.tensor([[1.0, 0, 1]] * 4)
    out = partial.encode(attrs, z, known=known)
    assert torch.equal(out[:, 12:15], known) and (out[:, 4:8] == 0).all() and (out[:, -1] == 0).all()
    torch.testing.assert_close(out[:, :4], z[:, 0])  # specified and present: Z_k
    with pytest.raises(ValueError, match="trained with attr_dropout = 0"):
        plain.encode(attrs, z, known=known)
    partial.train()
    torch.manual_seed(0)
    out = torch.cat([partial(attrs.repeat(500, 1), None) for _ in range(2)])
    hidden = 1 - out[out[:, -1] == 0, 12:15].mean().item()  # among rows not dropped for CFG
    assert abs(hidden - 0.3) < 0.03



def test_the_known_bit_contains_a_learned_null_embedding_exactly():
    """The alternative to the known bit, a learned null vector e_k in attribute k's latent slot when it is
    unspecified, is one k-diffusion's image_v1 already represents: its mapping_cond layer (no bias) sends the
    known bit to a learned vector, and the mapping network's first bias absorbs the constant. Built here as
    weights of the known-bit model that give the null-embedding model's mapping output to float precision."""
    from gmmcond.modeling.models import image_v1

    K, N = 3, 4
    cond = GMMAttrs(num_attrs=K, dims_per_attr=N, attr_dropout=0.3).eval()
    torch.manual_seed(0)
    null_model = image_v1(K * N + 1, depths=(1,), channels=(8,), mapping_out=16)  # [Z slots, dropped]
    bit_model = image_v1(cond.dim, depths=(1,), channels=(8,), mapping_out=16)  # [Z slots, known bits, dropped]
    e = torch.randn(K, N)  # the null embeddings
    W = null_model.mapping_cond.weight.detach()
    shift = W[:, :K * N] @ e.flatten()  # sum_k W_k e_k, what the null model adds when nothing is specified
    with torch.no_grad():
        bit_model.mapping.load_state_dict(null_model.mapping.state_dict())
        bit_model.mapping[0].bias += bit_model.mapping[0].weight @ shift
        per_attr = torch.einsum("fkn,kn->fk", W[:, :K * N].view(-1, K, N), e)  # W_k e_k, one column per attribute
        bit_model.mapping_cond.weight.copy_(torch.cat([W[:, :K * N], -per_attr,
                                                       W[:, -1:] - shift[:, None]], 1))

    def null_encode(attrs, z, known, drop):
        slots = z * (attrs * known)[..., None] + e * (1 - known)[..., None]
        return torch.cat([slots.flatten(1) * (~drop)[:, None], drop[:, None].float()], 1)

    def mapping(model, c):
        return model.mapping(model.timestep_embed(torch.zeros(len(c), 1)) + model.mapping_cond(c))

    n = 64
    attrs, known = (torch.rand(n, K) < 0.5).float(), (torch.rand(n, K) < 0.6).float()
    drop = torch.rand(n) < 0.2
    z = cond.sample_latents(n, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mapping(bit_model, cond.encode(attrs, z, drop, known)),
                                   mapping(null_model, null_encode(attrs, z, known, drop)), atol=1e-5, rtol=1e-5)
        # the known bit is not a no-op: without its learned vector the outputs differ
        bit_model.mapping_cond.weight[:, K * N:K * N + K] = 0
        assert not torch.allclose(mapping(bit_model, cond.encode(attrs, z, drop, known)),
                                  mapping(null_model, null_encode(attrs, z, known, drop)), atol=1e-3)

def test_the_fixed_value_conditioner_is_the_attribute_vector_and_the_dropped_flag():
    cond = CONDITIONERS.build({"type": "attrs", "cond_dropout": 0.5}, num_attrs=5)
    attrs = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    assert cond.dim == 6 and not cond.partial
    assert torch.equal(cond.eval()(attrs), torch.cat([attrs, torch.zeros(2, 1)], 1))
    dropped = cond.encode(attrs, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], cond.unconditional(1)[0]) and torch.equal(dropped[1, :5], attrs[1])
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    assert cond.sample_latents(3, gen).shape == (3, 5, 0) and torch.equal(gen.get_state(), before)  # draws nothing
    torch.manual_seed(0)
    flags = cond.train()(attrs.repeat(500, 1))[:, -1]
    assert 0.4 < flags.mean().item() < 0.6  # cond_dropout in training
    with pytest.raises(Exception, match="specifies every attribute"):
        cond.encode(attrs, known=torch.zeros_like(attrs))


def test_a_fixed_value_run_trains_samples_and_is_checked_for_memorisation(tiny_cfg, tmp_path):
    from gmmcond.engine.trainer import train
    from gmmcond.eval.evaluate import EvalSize, evaluate_run

    train(tiny_cfg("conditioner=attrs"), tmp_path / "run")
    result = evaluate_run(tmp_path / "run", {"steps": 2}, EvalSize(n=8, sets=0, memorisation=8), progress=False)
    mem = result["memorisation"]
    assert mem["latents"] == "none (no latent)" and mem["n"] == 8 and 0 <= mem["auth_pct"]["value"] <= 100
    assert 0 < mem["own_row_chance"] <= 1
    assert result["headline"]["auth_pct"] == mem["auth_pct"] and (tmp_path / "run" / "eval_memorisation.png").exists()


def test_constant_pairing_is_eq9_with_every_latent_entry_the_mixture_mean():
    cond = make(pairing="constant", weights=[0.2, 0.3, 0.5]).eval()
    mean = 0.2 * 1 + 0.3 * 2 + 0.5 * 3
    z = cond.sample_latents(3, torch.Generator().manual_seed(0))
    assert torch.allclose(z, torch.full((3, 5, 4), mean)) and not cond.pairs_latents
    attrs = torch.tensor([[1.0, 0, 1, 0, 0]] * 3)
    out = cond(attrs, torch.arange(3))
    assert torch.allclose(out[:, :20], (attrs[..., None] * mean).expand(3, 5, 4).flatten(1)) and (out[:, 20] == 0).all()
    assert cond.dim == make().dim  # same dimension, flag and magnitude as the GMM latent: only the randomness differs


def test_attribute_dropout_modes_and_group_hiding():
    plain = make(attr_dropout=0.3)
    torch.manual_seed(0)
    known = plain.training_known(4000)
    torch.manual_seed(0)
    assert torch.equal(known, (torch.rand(4000, 5) >= 0.3).float())  # the earlier draw, bit for bit
    wide = make(attr_dropout=0.3, attr_dropout_mode="per_sample")
    hidden = 5 - wide.training_known(4000).sum(1)
    # P(>= 4 of 5 hidden): 5 p^4 (1 - p) + p^5 = 0.031 at p = 0.3; averaged over p ~ U(0, 0.6): 0.078
    assert abs(((5 - known.sum(1)) >= 4).float().mean() - 0.031) < 0.01
    assert abs(hidden.mean() / 5 - 0.3) < 0.02 and abs((hidden >= 4).float().mean() - 0.078) < 0.015
    grouped = make(attr_dropout=0.3, hide_groups=True)
    grouped.set_groups([[0, 1, 2]])
    k = grouped.training_known(2000)
    assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 0], k[:, 2]) and abs(1 - k[:, 0].mean() - 0.3) < 0.04
    assert not torch.equal(k[:, 3], k[:, 4])  # the others stay independent
    null = make(attr_dropout=0.3).all_unknown(2)
    assert null.shape == (2, make(attr_dropout=0.3).dim) and (null == 0).all() and make().all_unknown(2) is None
    with pytest.raises(ValueError, match="attr_dropout must be <= 0.5"):
        make(attr_dropout=0.6, attr_dropout_mode="per_sample")
    with pytest.raises(ValueError, match="attr_dropout_mode must be one of per_attribute, per_sample"):
        make(attr_dropout=0.2, attr_dropout_mode="sometimes")


TOKENS = ("conditioner={type: gmm_tokens, attr_dropout: 0.3}", "model.cross_cond_dim=16",
          "model.cross_attn_depths=[false,true]")


def _tokens_model(tiny_cfg, *extra):
    from gmmcond.modeling.build import build

    torch.manual_seed(0)
    parts = build(tiny_cfg(*TOKENS, *extra))
    with torch.no_grad():  # k-diffusion zero-initialises the layers a condition enters by: make them matter
        for p in parts.denoiser.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return parts


def test_padded_attribute_tokens_are_as_if_removed_and_the_null_token_is_always_there(tiny_cfg):
    """With the null token present and every other token padded, the model's output equals the same model
    given only the unpadded tokens; a dropped condition attends to the null token alone."""
    parts = _tokens_model(tiny_cfg)
    wrapper, cond = parts.denoiser.inner_model, parts.conditioner.eval()
    k = cond.num_attrs
    attrs = torch.zeros(1, k)
    attrs[0, [0, 3, 6]] = 1
    known = torch.ones(1, k)
    known[0, [1, 4, 5, 8]] = 0  # open: padded out
    flat = cond.encode(attrs, cond.sample_latents(1, torch.Generator().manual_seed(1)), known=known)
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([1.3])
    tokens, padding = wrapper.tokens(flat)
    assert padding[0, 0] == 0 and padding[0, 1:].tolist() == (1 - known[0]).tolist()
    kept = padding[0] == 0
    with torch.no_grad():
        full = wrapper(x, sigma, mapping_cond=flat)
        removed = wrapper.inner_model(x, sigma, cross_cond=tokens[:, kept], cross_cond_padding=padding[:, kept])
        torch.testing.assert_close(full, removed, rtol=0, atol=1e-6)
        dropped = cond.unconditional(1)
        t, p = wrapper.tokens(dropped)
        assert p[0].tolist() == [0.0] + [1.0] * k
        alone = wrapper.inner_model(x, sigma, cross_cond=t[:, :1], cross_cond_padding=p[:, :1])
        torch.testing.assert_close(wrapper(x, sigma, mapping_cond=dropped), alone, rtol=0, atol=1e-6)


def test_gradients_reach_every_unpadded_token_and_no_padded_one(tiny_cfg):
    parts = _tokens_model(tiny_cfg)
    wrapper, cond = parts.denoiser.inner_model, parts.conditioner.eval()
    k = cond.num_attrs
    attrs = (torch.rand(4, k) > 0.5).float()
    known = torch.ones(4, k)
    known[:, 2] = 0  # attribute 2 open in every sample
    flat = cond.encode(attrs, cond.sample_latents(4, torch.Generator().manual_seed(2)), known=known)
    tokens, padding = wrapper.tokens(flat)
    tokens.retain_grad()
    wrapper.inner_model(torch.randn(4, 3, 16, 16), torch.full((4,), 0.8), cross_cond=tokens,
                        cross_cond_padding=padding).square().mean().backward()
    grad = tokens.grad.abs().sum(-1)  # [B, 1 + K]
    assert bool((grad[padding == 0] > 0).all()) and float(grad[padding == 1].abs().max()) < 1e-8
    assert wrapper.null_token.grad.abs().sum() > 0 and wrapper.project.weight.grad.abs().sum() > 0
    assert wrapper.attr_embed.grad[2].abs().max() == 0 and wrapper.attr_embed.grad[[0, 1, 3]].abs().sum(1).min() > 0


def test_a_tokens_run_trains_samples_with_guidance_and_leaves_attributes_open(tiny_cfg, tmp_path):
    from gmmcond.engine.trainer import train
    from gmmcond.modeling.runs import load_run
    from gmmcond.sampling.sheets import sample_requests

    train(tiny_cfg(*TOKENS), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.parts.conditioner.tokens and run.parts.denoiser.inner_model.pooled is False
    for settings in ({"open": "model", "cfg_scale": 2.0}, {"open": "data", "cfg_scale": 1.5}):
        samples = sample_requests(run, ["circle,~red"], {**settings, "steps": 2}, n=2, log=lambda m: None)
        assert samples.images.shape == (2, 3, 16, 16) and torch.isfinite(samples.images).all()
    composed = sample_requests(run, [], {"steps": 2}, n=2, compose="circle:2,red:1", log=lambda m: None)
    assert torch.isfinite(composed.images).all()


def test_tokens_and_the_model_settings_they_need_go_together(tiny_cfg):
    from gmmcond.modeling.build import build

    with pytest.raises(ConfigError, match="set model.cross_cond_dim"):
        build(tiny_cfg("conditioner=gmm_tokens"))
    with pytest.raises(ConfigError, match="needs a conditioner that hands the model tokens"):
        build(tiny_cfg("model.cross_cond_dim=16", "model.cross_attn_depths=[false,true]"))
    with pytest.raises(ConfigError, match="at least one true exactly when model.cross_cond_dim > 0"):
        build(tiny_cfg("conditioner=gmm_tokens", "model.cross_cond_dim=16"))
    pooled = build(tiny_cfg(*TOKENS, "conditioner.pooled=true"))
    assert pooled.denoiser.inner_model.pooled and pooled.conditioner.mapping_dim == pooled.conditioner.dim


def test_a_run_from_before_tokens_loads_and_samples_what_it_sampled_then(tmp_path):
    """tests/data/old_run_9e0624c was trained and sampled at 9e0624c, the commit before attribute tokens (made by
    tests/data/make_old_run.py). Today's code loads it as the pooled model it was and draws the same images for the
    same requests: exactly on the host that made it; within 1e-5 here, where a changed condition moves them by ~0.2."""
    import importlib.util
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from gmmcond.modeling.models import AttributeTokens
    from gmmcond.modeling.runs import load_run
    from gmmcond.sampling.sheets import sample_requests

    fixture = Path(__file__).parent / "data" / "old_run_9e0624c"
    shutil.copytree(fixture, tmp_path / "run")  # loading may write beside the run (a lock); the fixture stays as made
    then = load_file(tmp_path / "run" / "drawn_then.safetensors")
    with safe_open(tmp_path / "run" / "drawn_then.safetensors", "pt") as f:
        assert f.metadata()["commit"].startswith("9e0624c")
    spec = importlib.util.spec_from_file_location("make_old_run", fixture.parent / "make_old_run.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # what was asked then, and how: the maker's own REQUESTS and draw()
    REQUESTS, draw = maker.REQUESTS, maker.draw
    run = load_run(tmp_path / "run")
    assert not run.parts.conditioner.tokens and not isinstance(run.parts.denoiser.inner_model, AttributeTokens)
    now = draw(tmp_path / "run")
    assert sorted(now) == sorted(then) == sorted(name for name, *_ in REQUESTS)
    for name in then:
        torch.testing.assert_close(now[name], then[name], atol=1e-5, rtol=0, msg=f"request {name!r}")
    # the fixture tells a change apart: the same noise under plain conditional sampling moves the images far more
    _, sets, settings, n = next(r for r in REQUESTS if r[0] == "data")
    unguided = sample_requests(run, sets, {**settings, "cfg_scale": 1.0}, n=n, log=lambda m: None).images
    assert (unguided - then["data"]).abs().max() > 1e-2
