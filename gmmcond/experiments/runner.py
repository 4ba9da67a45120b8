"""One experiment runner: what an experiment is asked for (:class:`Options`), the registry of experiments and the
options each takes (:data:`EXPERIMENTS`, filled by ``@experiment``), and the one resumable unit every experiment,
recipe probe and the editing measurement is built from: a result keyed by its full config, logged the moment it
is done and read back on a rerun (:meth:`gmmcond.io.ResultLog.once`), with its run folder named by a hash of that config
(:func:`run_folder`), so a rerun with other settings trains afresh instead of reusing a finished run.

``python launch/reproduce.py NAME`` is a thin entry point over this registry.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..io import Claim, ResultLog


@dataclass(frozen=True)
class Options:
    """What an experiment is asked for; each experiment takes the fields its registry entry lists (``takes``) and
    fills the rest it needs from its ``defaults``."""

    out: Path = Path("runs/reproduce")  # OUT: NAME.json, NAME.png, NAME.jsonl (the result log), runs/
    seeds: int | None = None
    steps: int | None = None  # training steps (editing: sampling steps)
    n: int | None = None  # evaluated samples per run (combinations: per combination)
    scale: str = "v1"  # SCALES key: the recipe scale every arm's overrides start from
    arms: tuple[str, ...] = ()  # some of the experiment's arms (default all)
    train: bool = True  # False: train and evaluate nothing, tabulate what is logged
    reuse: tuple[ResultLog, ...] = ()  # other experiments' result logs whose identical arms are taken over
    run: Path | None = None  # editing: the trained run whose edits are measured
    cfg_scale: float | None = None  # editing: the guidance scale (default the run's own sample.cfg_scale)
    progress: Callable[[str], None] = field(default=print, compare=False)

    def path(self, name: str, suffix: str) -> Path:
        """OUT/NAME.suffix."""
        return self.out / f"{name}.{suffix}"

    @property
    def runs(self) -> Path:
        """The folder the experiment's runs train into."""
        return self.out / "runs"


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: its function (Options -> the JSON result), the options it takes, its defaults."""

    name: str
    fn: Callable[[Options], dict]
    takes: frozenset[str]
    defaults: dict
    summary: str

    def options(self, given: dict) -> Options:
        """Options from ``given`` (None values unset): an option this experiment does not take is an error that
        names the experiments that do; unset ones come from the defaults."""
        valid = {f.name for f in fields(Options)}
        for key, value in given.items():
            if key not in valid:
                raise ConfigError(f"unknown experiment option {key!r}; valid: {', '.join(sorted(valid))}")
            if value is not None and value != () and key not in self.takes | {"out", "progress"}:
                users = [e.name for e in EXPERIMENTS.values() if key in e.takes]
                raise ConfigError(f"--{key.replace('_', '-')} applies to {', '.join(users) or 'no experiment'}, "
                                  f"not {self.name}")
        merged = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        return Options(**merged)

    def __call__(self, opts: Options) -> dict:
        return self.fn(opts)


EXPERIMENTS: dict[str, Experiment] = {}


def experiment(name: str, takes: tuple[str, ...], defaults: dict | None = None) -> Callable:
    """Register ``fn(opts: Options) -> dict`` as experiment ``name`` taking the options ``takes``, with ``defaults``
    for those the command line leaves unset."""
    def register(fn: Callable[[Options], dict]) -> Callable[[Options], dict]:
        EXPERIMENTS[name] = Experiment(name, fn, frozenset(takes), dict(defaults or {}), (fn.__doc__ or "").split("\n")[0])
        return fn
    return register


# ------------------------------------------------------------------------------------------- the resumable unit

def run_folder(runs: Path, stem: str, config: str) -> Path:
    """The run folder of an arm: RUNS/STEM_HASH, the hash of its full config (other settings, another folder: a
    finished run is only ever reused under the same config)."""
    return runs / f"{stem}_{hashlib.sha256(config.encode()).hexdigest()[:8]}"


def arm_slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


# Recipe values changed after the experiments were logged: {dotted key: (the recipe's value now, the value the
# logged runs trained with)}. Where an arm's recipe has the new value, the old one is set ahead of the arm's own
# overrides and left out of its key, so every logged result, run folder and reused record still matches, and a
# rerun trains what was logged. (The shapes recipe set sigma_data 0.5 until it was measured on the data, and guided
# at 1.5 until 2: RESULTS.md, "sigma_data measured on the data" and "Guidance 2".)
RECIPE_AS_LOGGED = {"denoiser.sigma_data": ("data", 0.5), "sample.cfg_scale": (2.0, 1.5)}


def logged_pins(recipe: str) -> list[str]:
    """The overrides that set ``recipe``'s changed values (:data:`RECIPE_AS_LOGGED`) back to the logged ones."""
    from ..config import load_config

    base, pins = load_config(recipe), []
    for dotted, (now, old) in RECIPE_AS_LOGGED.items():
        section, key = dotted.split(".")
        if base[section][key] == now:
            pins.append(f"{dotted}={old}")
    return pins


def arm_config(recipe: str, overrides: list[str], seed: int) -> tuple[list[str], str]:
    """An arm's full override list at ``seed`` (led by :func:`logged_pins`) and the key its result is stored under
    (without them)."""
    full = [*overrides, f"train.seed={seed}", f"conditioner.seed={seed}"]
    return [*logged_pins(recipe), *full], f"{recipe}: " + " ".join(full)


# Settings that change neither the trained weights, the logged loss curve nor the evaluation (grids are drawn from
# their own generator, checkpoints only save): two runs whose resolved configs differ only here are the same run
# (tests/test_train.py trains both ways and compares the weights bit for bit).
BOOKKEEPING = ("train.grid_every", "train.checkpoint_every", "train.keep_checkpoints", "sample.grid_rows",
               "sample.grid_cols")


# Settings added after results were logged, with the value that does what runs did before they existed: left out
# of a result's key at that value, so the keys logged before still match.
ADDED_SETTINGS = {"sample.cfg_interval": [], "train.posthoc_ema": [], "train.posthoc_every": 500}


def result_key(recipe: str, overrides: list[str], protocol: str) -> str:
    """A digest of what a logged result depends on: the resolved config less ``BOOKKEEPING`` (and less each of
    ``ADDED_SETTINGS`` at its old behaviour), and how the run was evaluated (``protocol``). Equal keys in two
    experiments' logs are one training and one evaluation."""
    from ..config import load_config

    cfg = load_config(recipe, [*logged_pins(recipe), *overrides])  # a logged key's overrides lack the pins
    for dotted in BOOKKEEPING:
        section, key = dotted.split(".")
        cfg.get(section, {}).pop(key, None)
    for dotted, old in ADDED_SETTINGS.items():
        section, key = dotted.split(".")
        if cfg.get(section, {}).get(key) == old:
            del cfg[section][key]
    blob = json.dumps({"config": cfg, "protocol": protocol}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


ArmEval = Callable[[str, int, str, list, Path, int], dict]  # (arm, seed, recipe, full overrides, run, n) -> record


def run_arms(arms: dict[str, tuple[str, list[str]]], log: ResultLog, opts: Options, prefix: str, *,
             evaluate: ArmEval, protocol: str | None = None, trained_by: dict[str, tuple] | None = None) -> None:
    """Train and evaluate every (arm, seed) not yet in ``log``, seed by seed, so each seed's arms land together.
    ``arms`` maps a name to (recipe, overrides), the overrides led by the experiment's scale; seed ``s`` adds
    ``train.seed=s conditioner.seed=s``. A result is keyed by its arm, seed and full override list (``config``),
    its run folder by a hash of that list (:func:`run_folder`). ``evaluate(arm, seed, recipe, full, run, n)``
    trains (resuming a partial run) and scores one arm. ``trained_by`` maps an arm to (another arm, its (recipe,
    overrides)) whose run folder it uses: arms that differ only in how they are sampled train once.
    ``opts.train=False`` starts nothing. ``opts.reuse``: other experiments' logs; where ``protocol`` names how an
    arm is evaluated, a record of theirs with the same :func:`result_key` (the same training and evaluation, e.g.
    Fig. 9's "no head" and Fig. 7's "features" at one scale) is logged again under this arm (``reused_from`` names
    its config) instead of training the run a second time. Several processes may work through the same list at
    once (``reproduce.py --jobs``): each unit is done by the one that claims its run folder first
    (:class:`gmmcond.io.Claim`), the others skip it and log what they finish in the same file."""
    if not opts.train:
        return
    for seed in range(opts.seeds):
        for arm, (recipe, overrides) in arms.items():
            full, config = arm_config(recipe, overrides, seed)
            owner, trains = (trained_by or {}).get(arm, (arm, (recipe, overrides)))
            run = run_folder(opts.runs, f"{prefix}_{arm_slug(owner)}_seed{seed}", arm_config(*trains, seed)[1])

            def compute() -> dict:
                key = result_key(recipe, full, protocol) if protocol else None
                twin = next((r for other in opts.reuse for r in other.records if key and r.get("result_key") == key), None)
                if twin:
                    opts.progress(f"  {arm} seed {seed}: the same run as {twin['arm']!r} seed {twin['seed']} in another "
                                  f"log, reused")
                    return {**{k: v for k, v in twin.items() if k not in ("arm", "seed", "config")},
                            "reused_from": twin["config"]}
                rec = {"run": str(run), **({"result_key": key} if key else {}), **evaluate(arm, seed, recipe, full, run, opts.n)}
                opts.progress(f"  {arm} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                                   if isinstance(v, float) and "reference" not in k))
                return rec

            key = {"arm": arm, "seed": seed, "config": config}
            log.refresh()  # what other workers (reproduce.py --jobs) finished meanwhile
            if log.done(tuple(key), **key):
                continue
            claim = Claim(run)  # one worker per run folder at a time; arms that share a run wait on one another
            if not claim.acquire():
                opts.progress(f"  {arm} seed {seed}: {run} is being worked on by another process; left to it")
                continue
            try:
                log.refresh()
                log.once(key, compute)
            finally:
                claim.release()


def core_groups(jobs: int) -> list[list[int]]:
    """The cores this process may run on, split into ``jobs`` contiguous groups as even as they go."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if not 1 <= jobs <= len(cores):
        raise ConfigError(f"--jobs {jobs}: this process may run on {len(cores)} core(s); give a number from 1 to "
                          f"{len(cores)}")
    return [cores[i * len(cores) // jobs:(i + 1) * len(cores) // jobs] for i in range(jobs)]


def run_workers(command: list[str], jobs: int, logs: list[Path], progress: Callable[[str], None] = print) -> list[int]:
    """Run ``command`` as ``jobs`` processes at once, each pinned to its own group of cores (:func:`core_groups`;
    torch then starts one thread per core of its group) with its output in ``logs[i]`` and ``{worker}`` in its
    arguments replaced by its number ``i``, and return their exit statuses. SIGINT (Ctrl-C) and SIGTERM sent to this
    process are passed on to every worker once (a trainer finishes its step and checkpoints). Experiments run this
    way split their arms through the run folders' claims (:func:`run_arms`)."""
    import signal
    import subprocess

    groups = core_groups(jobs)
    procs = []
    for i, (group, log) in enumerate(zip(groups, logs)):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            env = {**os.environ, "OMP_NUM_THREADS": str(len(group))}
            # a session of its own: a terminal's Ctrl-C reaches the workers once, through this process, not twice
            # (a trainer takes a second signal as "stop at once, without a checkpoint")
            procs.append(subprocess.Popen([a.replace("{worker}", str(i)) for a in command], stdout=out,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                          preexec_fn=lambda g=group: os.sched_setaffinity(0, g)))
        progress(f"worker {i} (pid {procs[-1].pid}) on core(s) {','.join(map(str, group))}: output in {log}")

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------ summaries

def summarise(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; 0 for one value) of ``values``, and their count."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired_verdict(diffs: list[float], claimed: int) -> dict:
    """The results' rule for a verdict on per-seed paired differences (issue 43): "held" when their mean lies in
    the ``claimed`` direction (``+1``: the arm is higher, ``-1``: lower) by more than twice its standard error
    (std / sqrt(n)), "did not hold" when it does so the other way, else "undecided". With it, ``seeds_to_decide``:
    the least n at which a mean and std as observed would be decided (|mean| > 2 std / sqrt(n)); None when decided
    already, for a mean of exactly zero, or from fewer than two seeds (no spread to go on)."""
    if claimed not in (1, -1):
        raise ValueError(f"claimed must be +1 (the arm is higher) or -1 (lower), not {claimed!r}")
    stat = summarise(diffs)
    n, mean, se = stat["n"], stat["mean"], stat["std"] / math.sqrt(stat["n"])
    if n >= 2 and abs(mean) > 2 * se:
        return {**stat, "se": se, "verdict": "held" if mean * claimed > 0 else "did not hold", "seeds_to_decide": None}
    need = math.floor((2 * stat["std"] / abs(mean)) ** 2) + 1 if n >= 2 and mean else None
    return {**stat, "se": se, "verdict": "undecided", "seeds_to_decide": need}


def arm_records(log: ResultLog, arms, arm: str, seeds: int) -> list[dict]:
    """The finished records of ``arm`` for seeds below ``seeds`` under its current settings (``arms[arm]``)."""
    want = {s: arm_config(*arms[arm], s)[1] for s in range(seeds)}
    return [r for r in log.records if r["arm"] == arm and r["seed"] < seeds and r.get("config") == want[r["seed"]]]


def summarise_records(rs: list[dict]) -> dict:
    """Mean +- std over records (one per seed) of every number they all share, and the records themselves in seed
    order."""
    rs = sorted(rs, key=lambda r: r.get("seed", 0))
    keys = [k for k, v in rs[0].items() if isinstance(v, (int, float)) and k not in ("seed", "steps")
            and all(isinstance(r.get(k), (int, float)) for r in rs)]
    return {**{k: summarise([r[k] for r in rs]) for k in keys},
            "per_seed": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rs]}


def summarise_arms(log: ResultLog, arms, seeds: int) -> dict:
    """Per arm: mean +- std over seeds of every number all its records share, and the per-seed records."""
    out = {}
    for arm in arms:
        rs = arm_records(log, arms, arm, seeds)
        if rs:
            out[arm] = summarise_records(rs)
    return out


def select_arms(table: dict, names) -> dict:
    """The arms of ``table`` named in ``names`` (all of them when ``names`` is empty), in the table's order; an
    unknown name is a ConfigError that lists the arms."""
    unknown = sorted(set(names or ()) - set(table))
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; this experiment's arms are: {', '.join(map(repr, table))}")
    return {a: v for a, v in table.items() if not names or a in names}


__all__ = ["Options", "Experiment", "EXPERIMENTS", "experiment", "run_folder", "run_arms", "run_workers", "core_groups",
           "arm_config", "arm_slug", "result_key", "BOOKKEEPING", "summarise", "paired_verdict", "summarise_records",
           "summarise_arms", "arm_records", "select_arms"]
