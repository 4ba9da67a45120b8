import re

import pytest
import yaml

from entry import ROOT
from gmmcond.config import load_config, recipes_dir, yaml_load
from gmmcond.errors import ConfigError
from gmmcond.data.attrs import parse_expr
from gmmcond.registry import DATASETS


def test_default_recipe_resolves_with_every_default():
    cfg = load_config("shapes")
    assert cfg["conditioner"]["type"] == "gmm_attrs" and cfg["conditioner"]["means"] == [1.0, 2.0, 3.0]
    assert cfg["train"]["steps"] > 0 and cfg["head"] == {"type": "none"}
    assert cfg["sample"]["sampler"] == {"type": "x0_reproject", "renoise": 0.5} and cfg["sample"]["cfg_scale"] == 2.0
    assert cfg["sample"]["steps"] == 100
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg  # the resolved config round-trips through YAML


def test_the_compose_recipe_is_the_default_plus_attribute_dropout():
    """shapes_compose must not drift from the default recipe (it once kept an old loss, sampler and model)."""
    compose, default = load_config("shapes_compose"), load_config("shapes")
    assert compose["conditioner"]["attr_dropout"] == 0.25 and default["conditioner"]["attr_dropout"] == 0
    for cfg in (compose, default):
        del cfg["name"], cfg["conditioner"]["attr_dropout"], cfg["sample"]["grid_rows"]
    assert compose == default


def test_the_tokens_recipe_is_the_default_with_attribute_tokens():
    """shapes_tokens is the default recipe with the conditioner and cross-attention the combination experiment's
    token arms train (TOKEN_MODEL), so the recipe is what was measured."""
    from gmmcond.experiments.reproduce import TOKEN_MODEL

    tokens, measured = load_config("shapes_tokens"), load_config("shapes", list(TOKEN_MODEL))
    assert tokens["conditioner"]["type"] == "gmm_tokens" and tokens["model"]["cross_cond_dim"] == 64
    del tokens["name"], measured["name"]
    assert tokens == measured


def test_the_tokens_and_pooled_recipe_is_the_tokens_recipe_with_the_pooled_vector():
    """shapes_tokens_pooled is what the combination experiment's "tokens + pooled" arms and the default-task runs
    trained (`--config shapes_tokens conditioner.pooled=true`)."""
    from gmmcond.experiments.reproduce import TOKEN_MODEL

    recipe, measured = load_config("shapes_tokens_pooled"), load_config("shapes", [*TOKEN_MODEL, "conditioner.pooled=true"])
    assert recipe["conditioner"]["pooled"] is True and load_config("shapes_tokens")["conditioner"]["pooled"] is False
    del recipe["name"], measured["name"]
    assert recipe == measured


def test_overrides_apply_with_yaml_values():
    cfg = load_config("shapes", ["train.steps=200", "conditioner.sigma=0.25", "conditioner.means=[-1.5,0,1.5]"])
    assert cfg["train"]["steps"] == 200 and cfg["conditioner"]["sigma"] == 0.25
    assert cfg["conditioner"]["means"] == [-1.5, 0, 1.5]


def test_override_expands_a_string_node():
    cfg = load_config("shapes_tiny", ["conditioner.pairing=resample"])
    assert cfg["conditioner"]["type"] == "gmm_attrs" and cfg["conditioner"]["pairing"] == "resample"


def test_typo_names_dotted_path_and_closest_key():
    with pytest.raises(ConfigError) as err:
        load_config("shapes", ["train.stpes=5"])
    msg = str(err.value)
    assert msg.startswith("train.stpes: unknown key; did you mean 'steps'? Valid keys: adamw_impl, batch_size, betas, ")


def test_typo_in_a_registered_node_checks_the_signature():
    with pytest.raises(ConfigError) as err:
        load_config("shapes", ["conditioner.sigmaa=0.3"])
    assert str(err.value) == (
        "conditioner.sigmaa: unknown key; did you mean 'sigma'? Valid keys: attr_dropout, attr_dropout_mode, cond_dropout, "
        "dims_per_attr, hide_groups, means, pairing, seed, sigma, weights")


def test_unknown_type_lists_registered_keys():
    with pytest.raises(ConfigError) as err:
        load_config("shapes", ["conditioner=gmm_atrs"])
    assert str(err.value) == (
        "conditioner.type: CONDITIONERS has no key 'gmm_atrs'; did you mean 'gmm_attrs'? Registered: attrs, gmm_attrs, gmm_tokens, none")


def test_unknown_top_level_section():
    with pytest.raises(ConfigError) as err:
        load_config("shapes", ["trian.steps=3"])
    assert str(err.value).startswith("trian: unknown key; did you mean 'train'? Valid keys: ")


def test_injected_key_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config("shapes", ["model.mapping_cond_dim=12"])
    assert str(err.value) == "model.mapping_cond_dim: set from conditioner.dim, never by hand; remove it"


def test_wrong_type_and_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"^train.steps: expected int, got 'many'$"):
        load_config("shapes", ["train.steps=many"])
    with pytest.raises(ConfigError, match="must look like dotted.path=value"):
        load_config("shapes", ["train.steps"])


def test_unknown_sampler_and_recipe():
    with pytest.raises(ConfigError, match=r"^sample.sampler.type: SAMPLERS has no key 'eulr'; did you mean 'euler'\?"):
        load_config("shapes", ["sample.sampler=eulr"])
    with pytest.raises(ConfigError, match=r"^no recipe 'shapez' in .*; did you mean 'shapes'\? Recipes: "):
        load_config("shapez")


def test_required_kwarg_and_yaml_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\ndataset: celeba\nmodel: image_v1\n")
    with pytest.raises(ConfigError, match=r"^dataset.root: required by DATASETS 'celeba' but not given$"):
        load_config(path)
    path.write_text("name: c\ndataset: {type: celeba, root: /data}\nmodel: image_v1\n")
    assert load_config(str(path))["dataset"]["root"] == "/data"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=0", "train.checkpoint_every: must be >= 1, got 0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.steps=-1", "train.steps: must be >= 1, got -1"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.precision=fp8", "train.precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("sample.cfg_interval=[5.0,1.0]", "sample.cfg_interval: must be [lo, hi] with 0 <= lo < hi"),
    ("sample.cfg_interval=[1.0]", "sample.cfg_interval: must be [lo, hi] with 0 <= lo < hi"),
    ("denoiser.sigma_data=date", "denoiser.sigma_data: must be a number > 0 (the data's standard deviation) or data"),
    ("denoiser.sigma_data=0", "denoiser.sigma_data: must be a number > 0"),
])
def test_out_of_range_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("shapes_tiny", [override])


def test_sigma_data_measured_on_the_data_is_a_setting_the_tilt_refuses():
    assert load_config("shapes_tiny", ["denoiser.sigma_data=data"])["denoiser"]["sigma_data"] == "data"
    with pytest.raises(ConfigError, match="schedule.tilt=soft_min_snr needs denoiser.sigma_data as a number"):
        load_config("shapes_tiny", ["denoiser.sigma_data=data", "schedule.tilt=soft_min_snr", "denoiser.loss=karras"])


def test_a_dotted_override_expands_a_plain_sampler_key():
    cfg = load_config("shapes", ["sample.sampler.renoise=0.25"])
    assert cfg["sample"]["sampler"] == {"type": "x0_reproject", "renoise": 0.25}
    cfg = load_config("shapes_tiny", ["sample.sampler.s_churn=0.1"])
    assert cfg["sample"]["sampler"]["type"] == "euler" and cfg["sample"]["sampler"]["s_churn"] == 0.1


def test_every_recipe_grid_row_is_a_valid_request():
    for path in sorted(recipes_dir().glob("*.yaml")):
        cfg = load_config(path)
        if cfg["dataset"]["type"] != "shapes":
            continue  # the others need local data to know their attribute names
        data = DATASETS.build(dict(cfg["dataset"], length=16))
        for row in cfg["sample"]["grid_rows"]:
            parse_expr(row, list(data.attr_names), data.groups)
    assert load_config("shapes_tiny")["sample"]["grid_rows"] == ["circle,red", "square,blue,large"]


def test_every_recipe_probe_builds():
    """A probe that does not build would fail minutes into `benchmark.py probes`; each one builds here."""
    from gmmcond.experiments.benchmarks import PROBES
    from gmmcond.modeling.build import build

    for name, overrides in PROBES.items():
        cfg = load_config("shapes", [*overrides, "dataset.length=64"])
        for override in overrides:  # each override landed where it names
            path, value = override.split("=", 1)
            node = cfg
            for key in path.split("."):
                node = node[key]
            assert node == yaml_load(value, override), (name, override)
        build(cfg)


@pytest.mark.parametrize("text", ["1e-4", "3E-4", "1e6", "1.0e-4", "2e-3"])
def test_yaml_floats_in_scientific_notation_are_floats(text, tmp_path):
    assert load_config("shapes_tiny", [f"train.lr={text}"])["train"]["lr"] == float(text)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text((ROOT / "registry" / "shapes_tiny.yaml").read_text().replace("  batch_size: 8", f"  batch_size: 8\n  lr: {text}"))
    cfg = load_config(recipe)
    assert cfg["train"]["lr"] == float(text) and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["steps"] == 3 and isinstance(cfg["train"]["steps"], int)  # ints stay ints


def test_the_paper_recipe_is_the_default_trained_and_sampled_the_papers_way_and_trains(tmp_path):
    """registry/shapes_paper.yaml is the default recipe with the paper's loss, schedule and sampler, and nothing
    else; the experiments' `paper` scale is the same recipe; it builds and trains a few steps."""
    from gmmcond.engine.trainer import train
    from gmmcond.experiments.reproduce import SCALES

    paper, default = load_config("shapes_paper"), load_config("shapes")
    assert paper["schedule"] == {"type": "vp_constant", "T": 100, "beta": 0.05} and paper["denoiser"]["loss"] == "eps"
    assert paper["sample"]["sampler"] == {"type": "x0_reproject", "renoise": 1.0}
    differ = {k for k in default if k != "name" and paper[k] != default[k]}
    assert differ == {"schedule", "denoiser", "sample"}
    assert {k for k in default["sample"] if paper["sample"][k] != default["sample"][k]} == {"sampler"}
    assert load_config("shapes", SCALES["paper"]) == dict(paper, name="shapes")
    tiny = ["model.channels=[8,8,8]", "model.depths=[1,1,1]", "model.mapping_out=16", "train.steps=3",
            "train.batch_size=8", "train.compile=false", "train.grid_every=0", "sample.steps=3", "sample.grid_rows=[]"]
    last = train(load_config("shapes_paper", tiny), tmp_path / "run")
    assert last["step"] == 3 and last["loss"] > 0


def test_a_recipe_on_a_base_is_the_base_with_each_key_set_as_an_override(tmp_path):
    """`base: NAME` sets every leaf of the file on the base recipe the way a dotted override sets it: a bare
    registry key grows into a node, a list replaces the whole list; a base beside the file is found by path."""
    (tmp_path / "mine.yaml").write_text(
        "base: shapes_tiny\nname: mine\nconditioner: {sigma: 0.25}\nschedule: {type: vp_constant, T: 50}\n"
        "sample: {grid_rows: [circle]}\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\nname: child\ntrain: {steps: 7}\n")
    overrides = ["conditioner.sigma=0.25", "schedule.type=vp_constant", "schedule.T=50", "sample.grid_rows=[circle]"]
    assert load_config(tmp_path / "mine.yaml") == dict(load_config("shapes_tiny", overrides), name="mine")
    assert load_config(tmp_path / "child.yaml") == dict(load_config("shapes_tiny", [*overrides, "train.steps=7"]),
                                                        name="child")
    assert load_config("shapes_tokens_pooled") == dict(  # the shipped chain: shapes -> shapes_tokens -> pooled
        load_config("shapes", ["model.cross_cond_dim=64", "model.cross_attn_depths=[false,true,true]",
                               "conditioner.type=gmm_tokens", "conditioner.pooled=true"]), name="shapes_tokens_pooled")


@pytest.mark.parametrize("text, message", [
    ("base: shapes_tny\nname: x\n", "did you mean 'shapes_tiny'"),
    ("base: shapes_tiny\ntrain: {steps: 2}\n", "name: required in a recipe built on a base"),
    ("base: [shapes]\nname: x\n", "base: must be a recipe name"),
    ("base: loop.yaml\nname: loop\n", "leads back to"),
    ("base: shapes_tiny\nname: x\ntrain: {stpes: 2}\n", "did you mean 'steps'"),
])
def test_a_bad_base_is_an_error_naming_the_file_and_the_fix(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "loop.yaml")
