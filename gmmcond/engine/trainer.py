"""The training loop: accelerate, AdamW, EMA, mixed precision, torch.compile, grids, metrics, exact resume.

Exact resume: the data order is a pure function of (seed, step), every process's RNG states (CPU and,
where present, every CUDA device's) are saved with the weights, and metrics logged after the checkpoint
are cut on resume, so a killed run continued with ``resume=True`` reproduces the uninterrupted run step
for step. Precision (``train.precision``) goes through accelerate's ``mixed_precision``: weights, EMA,
optimiser state and checkpoints stay fp32.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import k_diffusion as K
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, gather_object
from PIL import Image
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..config import dump_config, resolve
from ..data.attrs import describe, parse_expr
from ..data.cache import in_memory
from ..data.prior import PRIOR_FILE, AttributePrior, save_prior
from ..errors import (REQUEUE_EXIT, AttributeSpecError, CheckpointError, ConfigError, Interrupted, RunError,
                      StorageError, TrainingDiverged)
from ..io import (RunLock, append_metrics, atomic_write_bytes, checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint, previous_checkpoint,
                  read_metrics, save_checkpoint, truncate_metrics, write_json)
from ..modeling.build import Components, build, resolve_sigma_data
from ..modeling.objective import TrainingObjective, immiscible_noise
from ..sampling.generate import generate
from ..sampling.requests import DEFAULT_OPEN, resolve_requests
from ..sampling.settings import SamplingSettings
from ..utils import peak_rss_mb, usable_cores
from ..visualize import captioned_grid, plot_metrics, save_png
from ..modeling.precision import autocast, compile_model, first_compiled_call, resolve_precision
from ..modeling.runs import dataset_info, export_run
from ..registry import DATASETS
from .posthoc_ema import PowerEMA
from .trackers import flat_config, log_image, logging_dir, tracker_names


class StepBatchSampler(Sampler):
    """Yield this process's indices for each step from ``start_step``: a pure function of (seed, step).

    The global batch of step s is the slice [s*B, (s+1)*B) of a stream of per-epoch permutations;
    process ``rank`` of ``world`` takes every world-th index of it, so processes see disjoint shards.
    """

    def __init__(self, length: int, global_batch: int, seed: int, start_step: int, steps: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ConfigError(f"train.batch_size={global_batch} must be divisible by the {world} processes")
        if length < global_batch:
            raise ConfigError(f"the dataset has {length} items, fewer than train.batch_size={global_batch}")
        self.length, self.batch, self.seed = length, global_batch, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def indices(self, step: int) -> list[int]:
        """Return the global batch of ``step``."""
        lo, hi = step * self.batch, (step + 1) * self.batch
        out = []
        for epoch in range(lo // self.length, (hi - 1) // self.length + 1):
            perm = self._perm(epoch)
            a, b = max(lo - epoch * self.length, 0), min(hi - epoch * self.length, self.length)
            out.extend(perm[a:b].tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.indices(step)[self.rank :: self.world]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def lr_lambda(cfg: dict) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to ``lr_final_frac``."""
    t = cfg["train"]
    warm, steps, final, shape = t["warmup_steps"], t["steps"], t["lr_final_frac"], t["lr_decay"]
    if shape not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_decay must be 'constant' or 'cosine', got '{shape}'")

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if shape == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def ema_copy(denoiser: nn.Module) -> nn.Module:
    """Return a frozen deep copy of the denoiser for EMA, without the forward hooks of heads."""
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    for module in ema.modules():
        module._forward_hooks.clear()
    return ema


def labelled(iterable, label: str):
    """Yield from ``iterable``, each fetch inside ``record_function(label)`` (the data phase of a profile)."""
    iterator = iter(iterable)
    while True:
        with record_function(label):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


class EMAUpdate:
    """k-diffusion's ``ema_update`` (lerp each parameter toward the model's, copy buffers) with the tensor
    lists built once and one foreach call per step instead of a Python loop over every tensor; bit for bit
    the same arithmetic (tests/test_train.py)."""

    def __init__(self, model: nn.Module, averaged: nn.Module):
        params, avg = dict(model.named_parameters()), dict(averaged.named_parameters())
        buffers, avg_buffers = dict(model.named_buffers()), dict(averaged.named_buffers())
        if params.keys() != avg.keys() or buffers.keys() != avg_buffers.keys():
            raise RuntimeError("the EMA model's parameters or buffers differ from the model's")
        self.params, self.avg = [params[k] for k in params], [avg[k] for k in params]
        self.buffers, self.avg_buffers = [buffers[k] for k in buffers], [avg_buffers[k] for k in buffers]

    @torch.no_grad()
    def __call__(self, decay: float) -> None:
        torch._foreach_lerp_(self.avg, self.params, 1 - decay)
        if self.buffers:
            torch._foreach_copy_(self.avg_buffers, self.buffers)


def grid_rows(cfg: dict, parts: Components, n_rows: int = 6, log: Callable[[str], None] = print) -> list[str]:
    """Return the attribute requests of the sample grid, checked against the dataset's attributes before training:
    the config's ``sample.grid_rows``, or the first dataset items' rows where it has none or where its rows were
    written for other data (none of their names is an attribute here: a recipe used on a user's data; said in
    one line). A row naming some attributes of this dataset and some unknown ones is a typo: a ConfigError."""
    rows = list(cfg["sample"]["grid_rows"])
    named = {t.strip().lstrip("~").strip() for r in rows for t in str(r).split(",") if t.strip()}
    if rows and named & set(parts.attr_names):
        for row in rows:
            try:
                parse_expr(str(row), parts.attr_names, parts.groups)
            except AttributeSpecError as exc:
                raise ConfigError(f"sample.grid_rows: {exc}") from None
        return rows
    picked = [describe(parts.dataset[i][1], parts.attr_names) for i in range(min(n_rows, len(parts.dataset)))]
    if rows:
        log(f"gmmcond: sample.grid_rows {rows[:2]}... name no attribute of this dataset (written for other data); "
            f"the grids show the first {len(picked)} items' rows instead (set sample.grid_rows=[...] to choose)")
    return picked


def write_grid(cfg: dict, parts: Components, ema: nn.Module, path: Path, precision: str = "fp32",
               rows: list[str] | None = None, prior: AttributePrior | None = None) -> Image.Image:
    """Sample the grid rows (default :func:`grid_rows`) with the EMA model, write a captioned PNG and return it.
    Open attributes are drawn from ``prior`` (``open="data"``) where one is given, else absent."""
    s = cfg["sample"]
    rows = grid_rows(cfg, parts) if rows is None else rows
    requests = [parse_expr(r, parts.attr_names, parts.groups) for r in rows]
    resolved = resolve_requests(requests, s["grid_cols"], open=DEFAULT_OPEN if prior is not None else "absent",
                                prior=prior, seed=s["seed"])
    with autocast(next(ema.parameters()).device, precision):
        images = generate(parts, resolved.attrs, SamplingSettings.from_config(s), model=ema)
    grid = captioned_grid(list(images.float().split(s["grid_cols"])), rows)
    save_png(grid, path)
    return grid


def rng_state() -> dict:
    """Return this process's RNG states: the CPU generator and every CUDA device's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict | torch.Tensor) -> None:
    """Restore what :func:`rng_state` returned (a bare tensor is an older, CPU-only checkpoint)."""
    if torch.is_tensor(state):
        state = {"cpu": state, "cuda": []}
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise RunError(f"the checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, but this machine has "
                           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; resume it where it was trained")
        torch.cuda.set_rng_state_all(state["cuda"])


class LossWatch:
    """Tells which checkpoints were taken before the loss left its recent range.

    A step's loss is healthy when it is finite and at most ``factor`` times the median of the last ``window``
    healthy losses; an unhealthy stretch starts at its first unhealthy step b. The loss of step c + 1 is
    computed with the weights of checkpoint c, so checkpoint c is good when that loss was healthy and
    c + 1 <= b. A sudden NaN after a healthy stretch, with finite weights, does not condemn the checkpoint
    just before it (the weights are the ones checked). A NaN stop names the newest good checkpoint, not the
    newest one, which may already hold diverged weights.
    """

    def __init__(self, factor: float = 10.0, window: int = 50):
        self.factor, self.recent = factor, deque(maxlen=window)
        self.bad_since: int | None = None  # first step of the current unhealthy stretch
        self.pending: set[int] = set()  # checkpoints whose next step has not run yet
        self.verdict: dict[int, bool] = {}  # checkpoint step -> was the loss right after it healthy?

    def checkpointed(self, step: int) -> None:
        self.pending.add(step)

    def update(self, step: int, loss: float, weights_finite: bool = False) -> bool:
        """Record the (global mean) loss of ``step`` (1-based); return whether it is healthy."""
        ok = math.isfinite(loss) and (not self.recent or loss <= self.factor * statistics.median(self.recent))
        sudden_nan = not math.isfinite(loss) and self.bad_since is None and weights_finite
        if step - 1 in self.pending:
            self.pending.discard(step - 1)
            self.verdict[step - 1] = ok or sudden_nan
        if ok:
            self.recent.append(loss)
            self.bad_since = None
        elif self.bad_since is None:
            self.bad_since = step
        return ok

    def good(self) -> list[int]:
        """Checkpoint steps known good, oldest first."""
        return sorted(c for c, ok in self.verdict.items() if ok and (self.bad_since is None or c + 1 <= self.bad_since))


# train.minutes: the step count is fitted once, at the end of the warm-up (whose lr does not depend on train.steps, so
# the run is the one train.steps=N gives) from the steps after the first (which compiles); at least
# BUDGET_CALIBRATION_STEPS of them, and no later than when they have taken BUDGET_CALIBRATION_SHARE of the budget. Twenty
# steps straight after compiling ran 5 to 10% faster than the run went on to (RESULTS.md, the model's shape at ten
# minutes). BUDGET_SHARE: the share of the budget left that the fitted steps may take (grids, checkpoints, the export
# take the rest).
BUDGET_CALIBRATION_STEPS = 20
BUDGET_CALIBRATION_SHARE = 0.1
BUDGET_SHARE = 0.95


def fitted_steps(budget_s: float, sec_per_step: float, done: int, cap: int) -> int:
    """The step count a wall-clock budget fits: the steps done, plus what ``BUDGET_SHARE`` of the seconds left
    holds at the measured step time; at least one more step, at most ``cap``."""
    return max(done + 1, min(cap, done + int(BUDGET_SHARE * max(0.0, budget_s) / sec_per_step)))


# train.* values a resumed run may change (they apply from the resumed step; config.yaml records the change),
# and those it may not, with the reason.
RESUME_REFUSED = {
    "batch_size": "the data order is a function of (seed, step, batch size), so the continued run would not be this run",
    "seed": "the data order and the noise streams are functions of the seed; the checkpoint carries the streams",
    "posthoc_ema": "the post-hoc EMA tracks average from the first step, so they cannot start, stop or change midway",
}


class Trainer:
    """One training run, in small named steps: set-up, restore, step, log, checkpoint, grid, finish."""

    LOGGED_CURVES = ("loss", "diffusion", "head_w1", "coind")

    def __init__(self, cfg: dict, run_dir: str | Path, *, resume: bool | str = False,
                 on_step: Callable[[int, dict], None] | None = None, accelerator: Accelerator | None = None):
        self.cfg, self.t, self.run_dir, self.on_step = cfg, cfg["train"], Path(run_dir), on_step
        self.precision = resolve_precision(self.t["precision"], "cuda" if torch.cuda.is_available() else "cpu")
        trackers = tracker_names(self.t["log_with"])
        if accelerator is None:
            # accelerate keeps one mixed-precision setting per process; a second training in the same process
            # (the experiments train several arms) may need another, so forget the previous run's. The
            # distributed state (PartialState: process group, ranks) is kept.
            AcceleratorState._reset_state()
            # cpu=True on CPU-only machines lets accelerate run torchrun/accelerate-launch processes as MULTI_CPU (gloo)
            accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=self.precision.accelerate,
                                      log_with=trackers or None, project_dir=str(logging_dir(self.run_dir)))
        elif trackers and not accelerator.log_with:
            raise ConfigError(f"train.log_with {trackers}: the accelerator passed to the trainer was made without "
                              f"trackers; build it with Accelerator(log_with=...) or pass none")
        self.accelerator = accelerator
        acc = self.accelerator
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.device = acc.device
        if self.world > 1:  # one line per process, so a launcher that started fewer than asked shows it at once
            print(f"gmmcond: process {self.rank} of {self.world} ({acc.distributed_type.value}, {self.device.type})", flush=True)
        self.lock = RunLock(self.run_dir)
        if self.main:
            note = self.lock.acquire()
            if note:
                acc.print(note)
        try:
            self._setup(resume)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: bool | str) -> None:
        cfg, acc = self.cfg, self.accelerator
        self._set_threads()
        self.ckpt_path = self._checkpoint_to_resume(resume)

        torch.manual_seed(self.t["seed"])  # identical initial weights on every process
        dataset = DATASETS.build(cfg["dataset"])
        measured = resolve_sigma_data(cfg, dataset)  # the number goes into config.yaml; a resume measures it again
        if measured is not cfg:
            self.cfg = cfg = measured
            acc.print(f"gmmcond: denoiser.sigma_data {cfg['denoiser']['sigma_data']}, measured on the training data "
                      f"(recorded in config.yaml)")
        self.parts = build(cfg, dataset)
        self.ema = ema_copy(self.parts.denoiser)
        self.grid_texts = grid_rows(cfg, self.parts, log=acc.print)  # checked before the first step, on every process
        # the training split's attribute rows: written into the run directory, and what the grids' open attributes
        # are drawn from (main process; nothing here touches a random stream)
        self.prior = AttributePrior.from_dataset(self.parts.dataset) if self.main else None
        t = self.t
        module = TrainingObjective(self.parts, t["coind_weight"], t["coind_fraction"], t["coind_space"],
                                   t["coind_unit"])
        # foreach: a few kernels per step over all tensors, bit for bit the per-tensor loop; fused: one kernel,
        # rounding differently (its profiled phase half as long on a 2-core CPU, the training step not measurably)
        self.opt = torch.optim.AdamW(module.parameters(), lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"],
                                     **{t["adamw_impl"]: True})
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.ema_sched = K.utils.EMAWarmup(power=t["ema_power"], max_value=t["ema_max"])
        self.start, self.elapsed, self.fitted = 0, 0.0, None
        torch.manual_seed(t["seed"] * 1000 + 1 + self.rank)  # per-process noise, sigma and dropout streams
        if self.ckpt_path is not None:
            self._restore(module, self.ckpt_path)
        if t["compile"]:
            compile_model(self.parts.denoiser, acc.print)
        self.module, self.opt = acc.prepare(module, self.opt)
        self.ema.to(self.device)
        self.unwrapped = acc.unwrap_model(self.module)
        self.ema_update = EMAUpdate(self.unwrapped.denoiser, self.ema)
        self.power_ema = PowerEMA(self.unwrapped.denoiser.inner_model, t["posthoc_ema"]) if t["posthoc_ema"] else None
        if self.power_ema is not None and self.ckpt_path is not None:
            self.power_ema.load_state_dict(self.restored_posthoc_ema)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.tic, self.last = 0, time.time(), {}
        self.watch = LossWatch()
        if self.ckpt_path is not None:
            self.watch.checkpointed(self.start)
        # a stop signal: received here (signum), and agreed by every process at the next step (stop_requested, stop_signal)
        self.received, self.stop_requested, self.stop_signal = 0, False, None

    # ------------------------------------------------------------------------------------------------ set-up
    def _set_threads(self) -> None:
        if self.device.type == "cpu":  # accelerate launch / torchrun pin OMP_NUM_THREADS=1; use the cores
            torch.set_flush_denormal(True)  # denormal floats make CPU math slow; flushing them costs nothing here
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(self.t["cpu_threads"] or max(1, usable_cores() // local))

    def _checkpoint_to_resume(self, resume: bool | str) -> Path | None:
        if resume in (False, None, ""):
            if (self.run_dir / "checkpoints" / "latest").exists():
                raise RunError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --name")
            return None
        if resume is True or resume == "latest":
            path = latest_checkpoint(self.run_dir)
            if path is None:
                runs = sorted(p.parent.parent.name for p in self.run_dir.parent.glob("*/checkpoints/latest"))
                raise RunError(f"--resume: {self.run_dir} holds no checkpoint to resume (runs with checkpoints in "
                               f"{self.run_dir.parent}: {', '.join(runs) or 'none'}); check --name, or drop --resume to start it")
            return path
        if resume == "previous":
            return previous_checkpoint(self.run_dir)
        path = Path(resume)
        if not path.exists():
            raise RunError(f"--resume-from {path}: no such checkpoint")
        return path

    def _restore(self, module: TrainingObjective, path: Path) -> None:
        state = load_checkpoint(path)
        trained = resolve(state["config"])  # a setting added since the checkpoint was written takes its default
        changed = [k for k in ("dataset", "model", "conditioner", "head", "denoiser") if trained[k] != self.cfg[k]]
        if changed:
            raise RunError(f"{path} was trained with different {', '.join(changed)} settings; resume with the "
                           f"run's own config ({self.run_dir / 'config.yaml'}) or start a new run")
        if len(state["rng"]) != self.world:
            raise RunError(f"{path} was written by {len(state['rng'])} processes; resume it with as many, not {self.world}")
        self.elapsed = state.get("elapsed", 0.0)  # training seconds before this resume (train.minutes)
        if self.t["minutes"] and trained["train"]["minutes"] == self.t["minutes"] and state.get("fitted"):
            self.t["steps"] = min(self.t["steps"], state["fitted"])  # the budget was fitted already: keep its steps
        changes = self._resume_changes(trained, state["step"], path)
        module.load_state_dict(state["model"])
        self.ema.inner_model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema_sched.load_state_dict(state["ema_sched"])
        self.restored_posthoc_ema = state.get("posthoc_ema")  # loaded into the tracks once the model is prepared
        if self.t["posthoc_ema"] and self.restored_posthoc_ema is None:
            raise CheckpointError(f"{path} holds no post-hoc EMA tracks, though its run kept them "
                                  f"(train.posthoc_ema={self.t['posthoc_ema']}): resume from a checkpoint that has them")
        set_rng_state(state["rng"][self.rank])
        self.start, self.fitted = state["step"], state.get("fitted")
        if changes:
            self._apply_resume_changes(changes)

    def _resume_changes(self, old: dict, step: int, path: Path) -> dict:
        """The train/sample values this resume changes, as {dotted key: {from, to}}, against the checkpoint's
        resolved config (a setting added since it was written counts at its default); refused ones raise."""
        changes = {}
        for section in ("train", "sample"):
            for key, value in self.cfg[section].items():
                before = old[section][key]
                if before != value:
                    changes[f"{section}.{key}"] = {"from": before, "to": value}
        refused = [k for k in changes if k.startswith("train.") and k[6:] in RESUME_REFUSED]
        if refused:
            reasons = "; ".join(f"{k} ({changes[k]['from']} -> {changes[k]['to']}): {RESUME_REFUSED[k[6:]]}" for k in refused)
            raise RunError(f"cannot change {reasons}. Resume with the run's own values or start a new run from {path}")
        if self.t["steps"] < step:
            raise RunError(f"train.steps={self.t['steps']} is before the checkpoint's step {step} ({path}); "
                           f"resume with train.steps >= {step}")
        history = list(old.get("history", []))
        if changes:
            history.append({"step": step, "changed": changes})
        if history:
            self.cfg["history"] = history
        return changes

    def _apply_resume_changes(self, changes: dict) -> None:
        """Make the restored optimiser, schedule and EMA follow the new config from the resumed step on."""
        t = self.t
        self.sched.base_lrs = [t["lr"] for _ in self.opt.param_groups]
        for group in self.opt.param_groups:
            group.update(initial_lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
            group["lr"] = t["lr"] * lr_lambda(self.cfg)(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.ema_sched.power, self.ema_sched.max_value = t["ema_power"], t["ema_max"]
        self.accelerator.print("gmmcond: resumed with changed " + ", ".join(
            f"{k} {v['from']} -> {v['to']}" for k, v in changes.items()) + f" from step {self.start} (recorded in config.yaml)")

    def _write_config(self) -> None:
        """RUN/config.yaml: the resolved config as this run trains it (the precision resolved, the history kept)."""
        resolved = dict(self.cfg, train=dict(self.t, precision=self.precision.name))
        atomic_write_bytes(self.run_dir / "config.yaml", dump_config(resolved).encode())

    def _prepare_run_dir(self) -> None:
        if not self.main:
            return
        for sub in ("checkpoints", "samples", "plots"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        write_json(self.run_dir / "dataset.json", dataset_info(self.parts.dataset))
        save_prior(self.run_dir / PRIOR_FILE, self.prior)
        truncate_metrics(self.metrics_file, self.start)  # lines logged after the checkpoint are logged again
        self.accelerator.print(
            f"gmmcond: {K.utils.n_params(self.unwrapped.denoiser) / 1e6:.2f}M parameters, {self.world} process(es), "
            f"precision {self.precision.name} ({self.precision.reason}), compile {self.t['compile']}, "
            f"steps {self.start}..{self.t['steps']}, run dir {self.run_dir}")

    # -------------------------------------------------------------------------------------------------- steps
    def train_step(self, step: int, images, attrs, index) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the per-sample losses (detached) and, with clipping on, the gradient norm
        before clipping and whether it was clipped. Stops on a non-finite loss."""
        # record_function labels name the phases in torch.profiler traces (launch/benchmark.py profile); free otherwise
        with record_function("gmmcond::forward"):
            images, attrs, index = images.to(self.device), attrs.to(self.device), index.to(self.device)
            noise = torch.randn_like(images)
            if self.t["immiscible"]:
                noise = immiscible_noise(images, noise)
            sigma = self.parts.schedule.sample_sigmas(len(images)).to(self.device)
            self.module.train()
            losses = self.module(images, attrs, index, noise, sigma)  # accelerate applies the autocast
            loss = losses["loss"].mean()
        with record_function("gmmcond::loss_check"):
            self._check_finite(loss, step)
        with record_function("gmmcond::backward"):
            self.opt.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
        with record_function("gmmcond::optimizer"):
            stats = {}
            if self.t["grad_clip"] > 0:  # the norm before clipping, and whether the clip bit (logged as interval means)
                norm = self.accelerator.clip_grad_norm_(self.module.parameters(), self.t["grad_clip"]).detach().float()
                stats = {"grad_norm": norm, "grad_clipped": (norm > self.t["grad_clip"]).float()}
            self.opt.step()
            self.sched.step()
        with record_function("gmmcond::ema"):
            self.ema_update(self.ema_sched.get_value())
            self.ema_sched.step()
            if self.power_ema is not None:
                self.power_ema.update()
        return {**{k: v.detach() for k, v in losses.items()}, **stats}

    def _check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Gather the step's loss (and, on several processes, whether any was interrupted); stop on NaN/inf.

        One host sync per step: the loss must be known finite before the optimiser applies it."""
        flags = torch.stack([loss.detach().float(), torch.tensor(float(self.received), device=loss.device)])
        synced = self.accelerator.gather(flags[None]) if self.world > 1 else flags[None]
        rows = synced.tolist()
        value = sum(r[0] for r in rows) / len(rows)
        signum = int(max(r[1] for r in rows))  # a signal any process received stops every process after this step
        if signum and not self.stop_requested:
            self.stop_requested, self.stop_signal = True, signal.Signals(signum).name
        finite = math.isfinite(value)
        weights_finite = finite or all(bool(torch.isfinite(p).all()) for p in self.module.parameters())
        self.watch.update(step + 1, value, weights_finite)
        if not finite:
            good = self.good_checkpoint()
            where = (f"the last good checkpoint (taken before the loss left its range) is {good}; continue from it "
                     f"with --resume-from {good} and a lower train.lr" if good else
                     "no checkpoint from before the loss left its range remains; start a new run with a lower train.lr")
            raise TrainingDiverged(
                f"loss is {value} at step {step + 1}; training stopped before the optimiser step, and {where} "
                f"(now {self.t['lr']}) or a larger train.warmup_steps (now {self.t['warmup_steps']}).")

    def fit_to_budget(self, done: int, step_seconds: list[float]) -> None:
        """train.minutes: fit train.steps to the minutes left at the median of ``step_seconds`` (decided on the main
        process, followed by all), refit the lr schedule, and record the fitted steps in config.yaml."""
        t, cap, sec_per_step = self.t, self.t["steps"], statistics.median(step_seconds)
        left = 60 * t["minutes"] - (self.elapsed + time.time() - self.t0)
        fitted = torch.tensor([fitted_steps(left, sec_per_step, done, cap)], device=self.device)
        if self.world > 1:
            fitted = broadcast(fitted, from_process=0)
        self.fitted = t["steps"] = int(fitted.item())
        self.sched.lr_lambdas = [lr_lambda(self.cfg)] * len(self.opt.param_groups)
        self.cfg["history"] = [*self.cfg.get("history", []), {"step": done, "fitted": {
            "train.steps": {"from": cap, "to": t["steps"]}, "train.minutes": t["minutes"],
            "sec_per_step": sec_per_step}}]
        if self.main:
            self._write_config()
        self.accelerator.print(
            f"gmmcond: train.minutes={t['minutes']:g}: {sec_per_step:.3f} s a step after compiling, "
            f"{max(0.0, left) / 60:.1f} minutes left: train.steps fitted to {t['steps']} (cap {cap}); "
            f"train.steps={t['steps']} reproduces this run (recorded in config.yaml)")
        if t["warmup_steps"] < done:
            self.accelerator.print(f"gmmcond: note: the steps were fitted after the warm-up ({t['warmup_steps']} steps), "
                                   f"so the lr before step {done} followed the cap's schedule")

    def good_checkpoint(self) -> Path | None:
        """The newest checkpoint on disk taken before the loss left its recent range (see :class:`LossWatch`)."""
        on_disk = {checkpoint_step(p): p for p in list_checkpoints(self.run_dir)}
        good = [c for c in self.watch.good() if c in on_disk]
        return on_disk[good[-1]] if good else None

    def accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        """Add this step's mean losses to the running sums, on the device (no host sync per step)."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.mean()
        self.count += 1

    def log(self, done: int) -> dict:
        """Gather the interval's means across processes once, append them to metrics.jsonl."""
        keys = sorted(self.sums)
        means = self.accelerator.gather(torch.stack([self.sums[k] for k in keys])[None]).mean(0) / self.count
        self.last = {"step": done, **dict(zip(keys, means.tolist())), "lr": self.sched.get_last_lr()[0],
                     "sec_per_step": (time.time() - self.tic) / self.count, "peak_rss_mb": peak_rss_mb()}
        if self.main:
            append_metrics(self.metrics_file, [self.last])
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in self.last.items() if k != "step"}, step=done)
        self.sums, self.count, self.tic = {}, 0, time.time()
        return self.last

    def checkpoint(self, step: int) -> None:
        """Write a checkpoint with every process's RNG states (main process writes)."""
        rng = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        if self.main:
            state = {"step": step, "model": self.unwrapped.state_dict(), "ema": self.ema.inner_model.state_dict(),
                     "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                     "ema_sched": self.ema_sched.state_dict(), "rng": list(rng), "config": self.cfg,
                     "elapsed": self.elapsed + time.time() - self.t0, "fitted": self.fitted}
            if self.power_ema is not None:
                state["posthoc_ema"] = self.power_ema.state_dict()
            try:
                save_checkpoint(self.run_dir, step, state, keep=self.t["keep_checkpoints"], protect=self.good_checkpoint())
            except StorageError as exc:
                kept = latest_checkpoint(self.run_dir)
                raise StorageError(f"{exc}. Training stopped at step {step}; " + (
                    f"{kept} ('latest') is intact: continue from it with --resume" if kept else
                    "no checkpoint was written yet: start again")) from None
        self.watch.checkpointed(step)
        self.accelerator.wait_for_everyone()

    def grid(self, step: int) -> None:
        """Write the EMA sample grid and the loss plot (main process)."""
        image = write_grid(self.cfg, self.parts, self.ema, self.run_dir / "samples" / f"grid_{step:07d}.png",
                           self.precision.name, self.grid_texts, self.prior)
        if self.accelerator.trackers:
            log_image(self.accelerator, "samples/grid", image, step)
        plot_metrics(read_metrics(self.metrics_file), self.run_dir / "plots" / "loss.png",
                     keys=[k for k in self.LOGGED_CURVES if k in self.last])

    def finish(self) -> None:
        """Check the processes agree and write ema.safetensors."""
        check_in_sync(self.accelerator, self.unwrapped)
        if self.main:
            export = self.run_dir / "ema.safetensors"
            try:
                export_run(export, self._ema_parts(), self.cfg, self.t["steps"])
            except StorageError as exc:
                raise StorageError(f"{exc}. The training finished and its last checkpoint is written: write the "
                                   f"export with launch/sample.py --run {self.run_dir} --export {export}") from None
        self.accelerator.wait_for_everyone()

    def _ema_parts(self) -> Components:
        return Components(self.parts.dataset, self.parts.conditioner, self.ema, self.parts.schedule,
                          self.unwrapped.head, self.parts.attr_names, self.parts.groups)

    # ---------------------------------------------------------------------------------------------------- run
    # the signals that stop a training cleanly: Ctrl-C, and what cluster schedulers send before SIGKILL (SIGTERM at
    # preemption or the end of an allocation; SIGUSR1 where a job asks for a warning ahead of time)
    STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def run(self) -> dict:
        """Train from the start (or resumed) step to ``train.steps``; return the last logged metrics.

        Ctrl-C (SIGINT), SIGTERM and SIGUSR1 finish the current step (every process stops at the same one), write
        a checkpoint and raise :class:`Interrupted` (exit status 2 for Ctrl-C, 75 for the scheduler's signals: try
        again); a second signal stops at once. The run lock is released however the run ends."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in self.STOP_SIGNALS}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.accelerator.trackers:
                self.accelerator.end_training()  # flush and close the trackers however the run ended
            self.lock.release()

    def _on_signal(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        if self.main:
            again = "Ctrl-C" if signum == signal.SIGINT else "a second signal"
            print(f"\ngmmcond: {signal.Signals(signum).name} received; finishing this step and writing a checkpoint "
                  f"({again} stops at once)", flush=True)

    def _stop(self, done: int) -> None:
        """After a stop signal: checkpoint the finished step (unless just written) and raise Interrupted."""
        if done % self.t["checkpoint_every"]:  # decided alike on every process (checkpoint() is collective)
            self.checkpoint(done)
        how = "interrupted" if self.stop_signal in (None, "SIGINT") else f"stopped by {self.stop_signal}"
        raise Interrupted(f"{how} after step {done} of {self.t['steps']}; checkpoint {latest_checkpoint(self.run_dir)}; "
                          f"continue with --resume", 2 if how == "interrupted" else REQUEUE_EXIT)

    def _run(self) -> dict:
        t = self.t
        self._prepare_run_dir()
        if self.accelerator.log_with:  # one tracker run per training process run (a resume starts another)
            self.accelerator.init_trackers(self.cfg.get("name") or self.run_dir.name, config=flat_config(self.cfg))
        sampler = StepBatchSampler(len(self.parts.dataset), t["batch_size"], t["seed"], self.start, t["steps"], self.rank, self.world)
        tic = time.time()
        cached = in_memory(self.parts.dataset, progress=self.main)
        if cached is not None:  # the embedded data: rendered once, a batch is one index (the same tensors)
            self.accelerator.print(f"gmmcond: rendered the {len(cached)} dataset items once in {time.time() - tic:.1f} s")
            loader = map(cached.batch, sampler)
        else:
            loader = DataLoader(self.parts.dataset, batch_sampler=sampler, num_workers=t["num_workers"],
                                generator=torch.Generator().manual_seed(t["seed"]))  # keeps the global RNG stream untouched
        bar = tqdm(total=t["steps"], initial=self.start, disable=not self.main, desc="train", dynamic_ncols=True)
        self.tic = self.t0 = time.time()
        budget = bool(t["minutes"]) and self.fitted is None  # fit train.steps once, after calibration steps
        calibrate_at = min(t["steps"] - 1, max(self.start + 1 + BUDGET_CALIBRATION_STEPS, t["warmup_steps"]))
        stamps = []
        if t["minutes"] and 60 * t["minutes"] <= self.elapsed:
            raise RunError(f"train.minutes={t['minutes']:g} is spent ({self.elapsed / 60:.1f} minutes trained); "
                           f"resume with a larger train.minutes, or train.minutes=0 and train.steps=N for N steps")
        for step, (images, attrs, index) in enumerate(labelled(loader, "gmmcond::data"), start=self.start):
            if step == self.start and t["compile"]:
                with first_compiled_call(self.accelerator.print):
                    self.accumulate(self.train_step(step, images, attrs, index))
            else:
                self.accumulate(self.train_step(step, images, attrs, index))
            done = step + 1
            bar.update(1)
            if budget:
                stamps.append(time.time())
                timed = len(stamps) - 1  # the first step (compiling) is left out of the step time
                if done >= calibrate_at or (timed >= BUDGET_CALIBRATION_STEPS and stamps[-1] - stamps[0]
                                            >= BUDGET_CALIBRATION_SHARE * 60 * t["minutes"]):
                    self.fit_to_budget(done, [b - a for a, b in zip(stamps[1:], stamps[2:])] or [time.time() - self.t0])
                    budget, bar.total = False, t["steps"]
            if done % t["log_every"] == 0 or done == t["steps"]:
                bar.set_postfix(loss=f"{self.log(done)['loss']:.4f}")
            if self.on_step is not None:
                self.on_step(done, self.last)
            if self.power_ema is not None and self.main and (done % t["posthoc_every"] == 0 or done >= t["steps"]):
                self.power_ema.snapshot(self.run_dir, done)  # before the checkpoint: a resume never skips one
            if done % t["checkpoint_every"] == 0 or done == t["steps"]:
                self.checkpoint(done)
            if self.main and ((t["grid_every"] and done % t["grid_every"] == 0) or done == t["steps"]):
                self.grid(done)
            if self.stop_requested and done < t["steps"]:
                bar.close()
                self._stop(done)
            if done >= t["steps"]:  # a fitted budget ends before the sampler's last step
                break
        bar.close()
        self.finish()
        return self.last


def train(
    cfg: dict,
    run_dir: str | Path,
    *,
    resume: bool | str = False,  # True/"latest": the latest checkpoint; "previous": the one before; or a path.
    on_step: Callable[[int, dict], None] | None = None,  # Called after every step with (step, metrics).
    accelerator: Accelerator | None = None,
) -> dict:
    """Train a resolved config into ``run_dir``; return the last logged metrics."""
    return Trainer(cfg, run_dir, resume=resume, on_step=on_step, accelerator=accelerator).run()


def check_in_sync(accelerator: Accelerator, module: nn.Module) -> None:
    """Check that every process holds the same parameters (a DDP invariant); raise if not."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])
    sums = gather_object([(flat.sum().item(), flat.abs().sum().item(), (flat * flat).sum().item())])
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"parameters differ across processes: {sums}")
    accelerator.print(f"gmmcond: parameters identical across {accelerator.num_processes} processes")
