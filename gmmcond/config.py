"""Strict YAML configs: recipes from ``registry/``, dotted overrides, every key validated.

A config node is a registry key (``conditioner: gmm_attrs``) or ``{type: key, **kwargs}``; its kwargs are
checked against the registered constructor's signature, and the resolved config (every default filled
in) is what a run directory records. Plain sections (``train``, ``sample``, ``denoiser``) are dataclasses.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError
from .registry import CONDITIONERS, DATASETS, DENOISER_LOSSES, HEADS, LOSSES, MODELS, SAMPLERS, SCHEDULES, Registry, closest


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float rule: ``1e-4``, ``3E-4`` and ``1e6`` are floats.

    PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent (``1.0e-4``), so it
    reads ``lr: 1e-4`` as the string ``'1e-4'``. Everything else (ints, bools, null) keeps the safe rules.
    """


FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                  for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789."))
# An int is tried before a float only where both resolvers claim the first character; keep ints ints.
for first, resolvers in Loader.yaml_implicit_resolvers.items():
    resolvers.sort(key=lambda pair: pair[0] != "tag:yaml.org,2002:int")


def yaml_load(text: str, source: str = "<string>") -> Any:
    """Parse YAML with :class:`Loader`; a syntax error is a ConfigError naming the file, line and column."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")) from None


def recipes_dir() -> Path:
    """Return the folder of named recipes: ``gmmcond/recipes`` (in a checkout a link to ``registry/``; installed, a
    copy of it), or ``registry/`` itself where a checkout could not make the link."""
    installed = Path(__file__).resolve().parent / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "registry"


RECIPES = recipes_dir()


@dataclass
class DenoiserConfig:
    # Expected std of the data (images in [-1, 1]); "data": measured on the training data when the run starts, and
    # recorded in its config.yaml (gmmcond.data.measure_sigma_data).
    sigma_data: Any = 0.5
    loss: str = "karras"  # karras | snr | soft_min_snr | eps (L_simple, the paper's).


@dataclass
class TrainConfig:
    steps: int = 2000  # Optimiser steps (with train.minutes: the most it may fit).
    # Wall-clock budget in minutes, compiling included; 0 is off. After a few steps the step count is fitted to the
    # minutes left from the measured step time (train.steps caps it), the lr schedule follows, and config.yaml
    # records the fitted train.steps, which reproduces the run with train.minutes off.
    minutes: float = 0.0
    batch_size: int = 64  # Global batch, split over processes.
    lr: float = 1e-3  # Peak AdamW learning rate.
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 1e-3
    warmup_steps: int = 100  # Linear warm-up, then the lr_decay shape.
    lr_decay: str = "cosine"  # constant | cosine (to lr_final_frac * lr at the last step)
    lr_final_frac: float = 0.1
    grad_clip: float = 1.0  # Max grad norm; 0 disables clipping.
    adamw_impl: str = "foreach"  # foreach | fused (one kernel, equal up to rounding; launch/figures/RESULTS.md, "Cost over plain k-diffusion").
    ema_power: float = 0.75  # k-diffusion EMAWarmup power.
    ema_max: float = 0.999  # k-diffusion EMAWarmup max decay.
    posthoc_ema: list = field(default_factory=list)  # sigma_rel of power-function EMA tracks kept for post-hoc EMA (EDM2: [0.05, 0.1]).
    posthoc_every: int = 500  # Steps between the post-hoc EMA tracks' snapshots (RUN/posthoc_ema/).
    log_every: int = 10  # Steps between metrics.jsonl lines.
    grid_every: int = 500  # Steps between sample grids (0: only at the end).
    checkpoint_every: int = 500  # Steps between checkpoints (always one at the end).
    keep_checkpoints: int = 2  # Older checkpoints are deleted.
    num_workers: int = 0  # DataLoader workers per process.
    cpu_threads: int = 0  # Torch threads per process on CPU; 0 = cores / local processes (launchers set 1).
    seed: int = 0  # Seeds the model init and the per-process noise streams.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast through accelerate; weights stay fp32.
    compile: bool = False  # torch.compile the inner model (compiles once, about a minute on a CPU).
    log_with: Any = None  # Trackers beside metrics.jsonl through accelerate: tensorboard | wandb | ... or a list.
    immiscible: bool = False  # Immiscible Diffusion (Li et al. 2024): each batch's noise assigned to its images by least distance.
    coind_weight: float = 0.0  # CoInD's independence penalty (needs conditioner.attr_dropout > 0); 0 is off.
    coind_fraction: float = 0.25  # Share of each batch the penalty is computed on (four extra forwards each).
    coind_space: str = "denoised"  # The penalty on the denoised image, or on the noise prediction (noise: as CoInD's authors).
    coind_unit: str = "attribute"  # What the penalty leaves out: one attribute, or one group (group: as CoInD's authors).


@dataclass
class SampleConfig:
    sampler: Any = "dpmpp_2m"  # A SAMPLERS key or {type: key, **options}.
    steps: int = 50  # Model evaluations for grids and launch/sample.py.
    cfg_scale: float = 1.0  # Classifier-free guidance scale (1: plain conditional).
    cfg_null: str = "dropped"  # What guidance pushes from: dropped (the trained null) or all_unknown (partial runs).
    cfg_interval: list = field(default_factory=list)  # [lo, hi]: guide only where lo < sigma <= hi; []: at every sigma.
    grid_rows: list = field(default_factory=list)  # Attribute sets ("circle,red") for training grids; [] picks from data.
    grid_cols: int = 8  # Samples per grid row.
    seed: int = 0  # Noise seed of the grids.


SECTIONS = {"denoiser": DenoiserConfig, "train": TrainConfig, "sample": SampleConfig}
MINIMUMS = {  # dotted key -> smallest valid value
    "train.steps": 1, "train.batch_size": 1, "train.log_every": 1, "train.checkpoint_every": 1, "train.grid_every": 0,
    "train.keep_checkpoints": 1, "train.posthoc_every": 1, "train.warmup_steps": 0, "train.num_workers": 0, "train.cpu_threads": 0,
    "train.lr": 0.0, "train.minutes": 0.0, "train.coind_weight": 0.0, "train.coind_fraction": 0.0, "sample.steps": 1, "sample.grid_cols": 1, "sample.cfg_scale": 0.0,
}
GUIDANCE_NULLS = ("dropped", "all_unknown")  # sample.cfg_null: what CFG and composed guidance push away from
CHOICES = {"train.precision": ("auto", "fp32", "bf16", "fp16"), "train.lr_decay": ("constant", "cosine"),
           "train.adamw_impl": ("foreach", "fused"),
           "sample.cfg_null": GUIDANCE_NULLS}
NODES: dict[str, Registry] = {
    "dataset": DATASETS, "model": MODELS, "conditioner": CONDITIONERS, "head": HEADS, "schedule": SCHEDULES,
}
TOP_LEVEL = ["name", *NODES, *SECTIONS, "history"]  # history: what a resume changed, at which step
NODE_PATHS = (*NODES, "sample.sampler")  # dotted paths whose value may be a bare registry key
DEFAULT_NODES = {"conditioner": "gmm_attrs", "head": "none", "schedule": "karras"}
SAMPLER_FIXED_ARGS = ("model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler")
INJECTED_FROM = {
    "mapping_cond_dim": "set from conditioner.dim", "num_attrs": "set from the dataset's attributes",
    "channels": "set from the model's bottleneck",
}


def _unknown_key(path: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    hint = closest(key, valid)
    hint = f"; did you mean '{hint}'?" if hint else ""
    return ConfigError(f"{path}: unknown key{hint} Valid keys: {', '.join(valid)}")


def _check_type(path: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default`` (ints are accepted as floats)."""
    if default is None or default is inspect.Parameter.empty or value is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if expected in (bool, int, float, str, list, tuple) and not isinstance(value, expected) or (
        expected is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{path}: expected {expected.__name__}, got {value!r}")
    return value


def signature_params(obj: Any, skip: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """Return the keyword parameters a config may set for a registered object."""
    skip = set(skip)
    params = inspect.signature(obj).parameters
    return {n: p for n, p in params.items() if n not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def resolve_node(path: str, node: Any, registry: Registry, skip: Iterable[str] = ()) -> dict:
    """Validate a ``{type: key, **kwargs}`` node against the registered signature; fill in defaults."""
    if isinstance(node, str):
        node = {"type": node}
    if not isinstance(node, dict) or "type" not in node:
        raise ConfigError(f"{path}: expected a {registry.name} key or a mapping with 'type', got {node!r}")
    key = node["type"]
    if key not in registry:
        raise ConfigError(f"{path}.type: {registry.unknown_message(key)}")
    params = signature_params(registry.get(key), skip)
    resolved = {"type": key}
    for name, value in node.items():
        if name == "type":
            continue
        if name in registry.injected:
            raise ConfigError(f"{path}.{name}: {INJECTED_FROM.get(name, 'set by gmmcond')}, never by hand; remove it")
        if name not in params:
            raise _unknown_key(f"{path}.{name}", name, [p for p in params if p not in registry.injected])
        resolved[name] = _check_type(f"{path}.{name}", value, params[name].default)
    for name, param in params.items():
        if name in resolved or name in registry.injected:
            continue
        if param.default is inspect.Parameter.empty:
            raise ConfigError(f"{path}.{name}: required by {registry.name} '{key}' but not given")
        default = param.default
        resolved[name] = list(default) if isinstance(default, tuple) else default
    return resolved


def resolve_section(path: str, values: Any, schema: type) -> dict:
    """Validate a plain section against its dataclass; fill in defaults."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    defaults = dataclasses.asdict(schema())
    for name in values:
        if name not in fields:
            raise _unknown_key(f"{path}.{name}", name, fields)
    return {
        name: values.get(name, defaults[name]) if fields[name].type in ("Any", Any)  # checked as a node later
        else _check_type(f"{path}.{name}", values.get(name, defaults[name]), defaults[name])
        for name in fields
    }


def check_cfg_interval(interval: Any, path: str = "sample.cfg_interval") -> None:
    """A guidance interval is empty (guide at every sigma) or two numbers ``lo < hi``, ``lo >= 0``."""
    if len(interval) == 0:
        return
    if len(interval) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval) \
            or not 0 <= interval[0] < interval[1]:
        raise ConfigError(f"{path}: must be [lo, hi] with 0 <= lo < hi (guide where lo < sigma <= hi) or [] (every "
                          f"sigma), got {list(interval)!r}")


def check_posthoc_ema(sigma_rels: Any, path: str = "train.posthoc_ema") -> None:
    """Post-hoc EMA tracks: a list of distinct relative standard deviations, each a power-function profile's."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigma_rels) \
            or len(set(sigma_rels)) != len(sigma_rels):
        raise ConfigError(f"{path}: must be a list of distinct numbers (each track's sigma_rel, EDM2 keeps [0.05, 0.1]) "
                          f"or [] (none), got {list(sigma_rels)!r}")
    for value in sigma_rels:
        from .engine.posthoc_ema import gamma_of_sigma_rel  # only where tracks are asked for (imports the engine)

        try:
            gamma_of_sigma_rel(value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def resolve(raw: dict) -> dict:
    """Validate a whole config dict and return it with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown_key(str(key), str(key), TOP_LEVEL)
    for key in ("name", "dataset", "model"):
        if key not in raw:
            raise ConfigError(f"{key}: required section missing")
    cfg: dict[str, Any] = {"name": str(raw["name"])}
    history = raw.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) and "step" in h for h in history):
        raise ConfigError("history: written by resumed runs as a list of {step, changed}; do not edit it by hand")
    for key, registry in NODES.items():
        cfg[key] = resolve_node(key, raw.get(key, DEFAULT_NODES.get(key)), registry)
    for key, schema in SECTIONS.items():
        cfg[key] = resolve_section(key, raw.get(key), schema)
    cfg["sample"]["sampler"] = resolve_node("sample.sampler", cfg["sample"]["sampler"], SAMPLERS, SAMPLER_FIXED_ARGS)
    check_cfg_interval(cfg["sample"]["cfg_interval"])
    check_posthoc_ema(cfg["train"]["posthoc_ema"])
    for dotted, low in MINIMUMS.items():
        section, key = dotted.split(".")
        if cfg[section][key] < low or (key == "lr" and cfg[section][key] == 0):
            raise ConfigError(f"{dotted}: must be {'> 0' if key == 'lr' else f'>= {low}'}, got {cfg[section][key]}")
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        if cfg[section][key] not in choices:
            raise ConfigError(f"{dotted}: must be one of {', '.join(choices)}, got {cfg[section][key]!r}")
    if cfg["head"]["type"] != "none":
        loss = cfg["head"].get("loss")
        if loss not in LOSSES:
            raise ConfigError(f"head.loss: {LOSSES.unknown_message(loss)}")
    if cfg["denoiser"]["loss"] not in DENOISER_LOSSES:
        raise _unknown_key("denoiser.loss", cfg["denoiser"]["loss"], DENOISER_LOSSES)
    sigma_data = cfg["denoiser"]["sigma_data"]
    if sigma_data != "data" and (isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float))
                                 or not sigma_data > 0):
        raise ConfigError(f"denoiser.sigma_data: must be a number > 0 (the data's standard deviation) or data (measured "
                          f"on the training data when the run starts), got {sigma_data!r}")
    tilt = cfg["schedule"].get("tilt", "none")
    if tilt != "none" and sigma_data == "data":
        raise ConfigError(f"schedule.tilt={tilt} needs denoiser.sigma_data as a number (equal to "
                          f"schedule.tilt_sigma_data), not data")
    if tilt != "none" and cfg["schedule"]["tilt_sigma_data"] != cfg["denoiser"]["sigma_data"]:
        raise ConfigError(f"schedule.tilt_sigma_data ({cfg['schedule']['tilt_sigma_data']}) must equal denoiser.sigma_data "
                          f"({cfg['denoiser']['sigma_data']}): the {tilt} tilt stands in for that weighting")
    if tilt != "none" and cfg["denoiser"]["loss"] != "karras":
        raise ConfigError(f"schedule.tilt={tilt} already weights the loss by drawing sigma; set denoiser.loss=karras "
                          f"(unit weight), not {cfg['denoiser']['loss']!r}, or the weighting counts twice")
    if history:
        cfg["history"] = history
    return cfg


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``dotted.path=value`` override (the value is parsed as YAML) to ``raw`` in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like dotted.path=value, e.g. train.steps=200")
    path, value = override.split("=", 1)
    set_dotted(raw, path.strip().split("."), yaml_load(value, f"override '{override}'"))


def set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    """Set ``raw[k1][k2]...`` to ``value`` in place, making the sections on the way; a node given as a bare registry
    key (``conditioner: gmm_attrs``) becomes ``{type: key}`` when a key below it is set."""
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        node_path = ".".join(keys[: depth + 1])
        if isinstance(child, str) and node_path in NODE_PATHS or child is None and key in NODES and depth == 0:
            # conditioner.sigma=0.3 on `conditioner: gmm_attrs` -> {type: gmm_attrs, sigma: 0.3}
            child = {"type": child or DEFAULT_NODES.get(key)}
        elif child is None and node_path == "sample.sampler":
            child = {"type": SampleConfig.sampler}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{node_path}: is {child!r}, not a section; cannot set {'.'.join(keys)}")
        node[key] = child
        node = child
    node[keys[-1]] = value


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterable[tuple[list[str], Any]]:
    """The (dotted keys, value) of every leaf of a nested mapping; a list or an empty mapping is a leaf."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, str(key)))
        else:
            yield [*prefix, str(key)], value


def read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file's raw mapping with its ``base`` applied: ``base: NAME`` (a recipe name, or a path beside the
    file) is that recipe with every leaf of this file set on it as a dotted override would set it (a list replaces
    the whole list). The file must name itself (``name``); a base that leads back to the file is an error."""
    raw = yaml_load(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: must be a recipe name or a path to one, got {base!r}")
    if "name" not in raw:
        raise ConfigError(f"{path}: name: required in a recipe built on a base (else it would be called '{base}')")
    beside = path.parent / base
    base_path = beside if beside.suffix in (".yaml", ".yml") and beside.exists() else recipe_path(base)
    chain = (*chain, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"{path}: base: '{base}' leads back to {base_path}: recipes cannot be their own base")
    merged = read_recipe(base_path, chain)
    if not isinstance(merged, dict):
        raise ConfigError(f"{base_path}: a recipe must be a mapping of sections (the base of {path})")
    for keys, value in leaves(raw):
        set_dotted(merged, keys, value)
    return merged


def recipe_path(name_or_path: str | Path) -> Path:
    """Return the YAML file for a recipe name in ``registry/`` or a path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        return path
    candidate = RECIPES / f"{name_or_path}.yaml"
    if not candidate.exists():
        names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        hint = closest(str(name_or_path), names)
        hint = f"; did you mean '{hint}'?" if hint else ""
        raise ConfigError(f"no recipe '{name_or_path}' in {RECIPES}{hint} Recipes: {', '.join(names)}")
    return candidate


def load_config(name_or_path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Load a recipe by name (``registry/NAME.yaml``) or path, apply dotted overrides, validate it."""
    raw = read_recipe(recipe_path(name_or_path))
    for override in overrides:
        apply_override(raw, override)
    return resolve(raw)


def dump_config(cfg: dict) -> str:
    """Serialise a resolved config as YAML."""
    return yaml.safe_dump(cfg, sort_keys=False)
