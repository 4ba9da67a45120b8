import pytest
import torch

from gmmcond.modeling.conditioners import GMMAttrs
from gmmcond.modeling.heads import BottleneckAttrs, attach, bottleneck
from gmmcond.sampling.guidance import HeadGuidedDenoiser, head_log_prob
from gmmcond.modeling.models import image_v1, make_denoiser
from gmmcond.registry import HEADS
from gmmcond.engine.trainer import ema_copy
from gmmcond.modeling.build import build


def tiny(augment_wrapper):
    torch.manual_seed(0)
    cond = GMMAttrs(num_attrs=4, cond_dropout=0.0).eval()
    inner = image_v1(cond.dim, mapping_out=16, depths=[1, 1], channels=[8, 16], augment_wrapper=augment_wrapper)
    denoiser = make_denoiser(inner)
    head = attach({"type": "bottleneck_attrs", "hidden": 16}, denoiser, num_attrs=4)
    return cond, denoiser, head


@pytest.mark.parametrize("augment_wrapper", [False, True])
def test_hook_finds_the_bottleneck_and_the_head_gradient_reaches_the_encoder(augment_wrapper):
    cond, denoiser, head = tiny(augment_wrapper)
    unet = (denoiser.inner_model.inner_model if augment_wrapper else denoiser.inner_model).u_net
    assert type(denoiser.inner_model).__name__ == ("KarrasAugmentWrapper" if augment_wrapper else "ImageDenoiserModelV1")
    assert bottleneck(denoiser) is unet.d_blocks[-1]
    x, attrs = torch.randn(3, 3, 16, 16), torch.tensor([[1.0, 0, 1, 0]] * 3)
    denoiser(x, torch.ones(3), mapping_cond=cond(attrs, torch.arange(3)))
    assert head.features.shape == (3, 16, 8, 8)
    loss = head.losses(attrs)["head"].sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.d_blocks[0].parameters())  # the encoder
    assert all(p.grad is None for p in unet.u_blocks.parameters())  # the decoder is after the bottleneck


def test_detached_head_leaves_the_encoder_alone():
    cond, denoiser, _ = tiny(False)
    head = HEADS.build({"type": "bottleneck_attrs", "detach": True, "hidden": 8}, num_attrs=4, channels=16)
    bottleneck(denoiser).register_forward_hook(head.hook)
    attrs = torch.ones(2, 4)
    denoiser(torch.randn(2, 3, 16, 16), torch.ones(2), mapping_cond=cond(attrs, torch.arange(2)))
    head.losses(attrs)["head"].sum().backward()
    assert all(p.grad is None for p in denoiser.parameters())
    assert all(p.grad is not None for p in head.parameters())


def test_head_metrics_are_accuracy_and_mean_abs_error():
    head = BottleneckAttrs(2, 4, hidden=4, loss="bce")
    head.features = torch.zeros(1, 4, 2, 2)
    with torch.no_grad():
        head.net[-1].weight.zero_()
        head.net[-1].bias.copy_(torch.tensor([2.0, -2.0]))
    out = head.losses(torch.tensor([[1.0, 1.0]]))
    q = torch.sigmoid(torch.tensor(2.0)).item()
    assert out["head_acc"].item() == 0.5 and out["head_w1"].item() == pytest.approx(((1 - q) + q) / 2)


def test_head_guidance_raises_the_head_probability_of_the_target():
    cond, denoiser, head = tiny(False)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16)
    sigma = torch.full((8,), 0.5)
    target = torch.tensor([1.0, 0.0, 1.0, 1.0])
    kwargs = {"mapping_cond": cond(target.expand(8, -1), torch.arange(8))}

    def head_logp(images):
        with torch.no_grad():
            denoiser(images, torch.full((8,), 0.05), **kwargs)
            return head_log_prob(head(), target.expand(8, -1)).mean().item()

    plain = denoiser(x, sigma, **kwargs).detach()
    guided = HeadGuidedDenoiser(denoiser, head, scale=20.0, target=target)(x, sigma, **kwargs)
    assert not torch.equal(plain, guided)
    assert head_logp(guided) > head_logp(plain)
    same = HeadGuidedDenoiser(denoiser, head, scale=0.0, target=target)(x, sigma, **kwargs)
    assert torch.allclose(same, plain)


def test_the_ema_copy_has_no_head_hook(tiny_cfg):
    parts = build(tiny_cfg("head=bottleneck_attrs"))
    hooked = [m for m in parts.denoiser.modules() if m._forward_hooks]
    assert len(hooked) == 1
    ema = ema_copy(parts.denoiser)
    assert not [m for m in ema.modules() if m._forward_hooks]
    parts.head.features = None
    ema(torch.randn(1, 3, 16, 16), torch.ones(1), mapping_cond=parts.conditioner.unconditional(1))
    assert parts.head.features is None  # the EMA forward does not feed the live head
