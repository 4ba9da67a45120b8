import inspect

import k_diffusion as K
import pytest

from gmmcond.registry import SAMPLERS, Registry, RegistryError


def test_register_get_contains_iterate():
    reg = Registry("THINGS")

    @reg.register("b")
    def make_b():
        return "b"

    reg.register("a", obj=len)
    assert reg.get("b") is make_b and reg.get("a") is len
    assert "a" in reg and "c" not in reg
    assert list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.build("b") == "b"


def test_unknown_key_names_registry_suggestion_and_keys():
    reg = Registry("THINGS")
    reg.register("gmm_attrs", obj=dict)
    reg.register("none", obj=dict)
    with pytest.raises(RegistryError) as err:
        reg.get("gmm_atrs")
    assert str(err.value) == "THINGS has no key 'gmm_atrs'; did you mean 'gmm_attrs'? Registered: gmm_attrs, none"
    with pytest.raises(RegistryError) as err:
        reg.get("zzz")
    assert str(err.value) == "THINGS has no key 'zzz' Registered: gmm_attrs, none"


def test_duplicate_key_is_an_error():
    reg = Registry("THINGS")
    reg.register("x", obj=dict)
    with pytest.raises(RegistryError, match="THINGS: key 'x' is already registered"):
        reg.register("x", obj=list)


def test_every_k_diffusion_sampler_is_registered_by_short_name():
    names = [n[len("sample_"):] for n in dir(K.sampling) if n.startswith("sample_")]
    assert {"euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "lms"} <= set(names)
    for name in names:
        assert name in SAMPLERS
        if name not in ("dpm_fast", "dpm_adaptive"):
            assert SAMPLERS.get(name) is getattr(K.sampling, f"sample_{name}")
    assert "x0_reproject" in SAMPLERS


def test_every_sampler_has_the_common_signature():
    for name in SAMPLERS:
        params = list(inspect.signature(SAMPLERS.get(name)).parameters)
        assert params[:3] == ["model", "x", "sigmas"], name


def test_register_as_a_plain_call_registers_the_class():
    reg = Registry("TEST")

    class MyThing:
        pass

    assert reg.register(MyThing) is MyThing
    assert reg.get("MyThing") is MyThing
    with pytest.raises(TypeError, match="the key must be a string"):
        reg.register(3)
