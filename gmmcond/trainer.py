"""The training loop: accelerate, AdamW, EMA, grids, metrics, atomic checkpoints, exact resume.

Exact resume: the data order is a pure function of (seed, step), every process's torch RNG state is
saved with the weights, and metrics logged after the checkpoint are cut on resume, so a killed run
continued with ``resume=True`` reproduces the uninterrupted run step for step.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import k_diffusion as K
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json
from .config import dump_config
from .pipeline import Components, build, dataset_info, describe, export_safetensors, generate, parse_attrs
from .visualize import captioned_grid, plot_metrics, save_png


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""


class StepBatchSampler(Sampler):
    """Yield this process's indices for each step from ``start_step``: a pure function of (seed, step).

    The global batch of step s is the slice [s*B, (s+1)*B) of a stream of per-epoch permutations;
    process ``rank`` of ``world`` takes every world-th index of it, so processes see disjoint shards.
    """

    def __init__(self, length: int, global_batch: int, seed: int, start_step: int, steps: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the {world} processes")
        if length < global_batch:
            raise ValueError(f"the dataset has {length} items, fewer than train.batch_size={global_batch}")
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


class DiffusionTrainer(nn.Module):
    """The module accelerate wraps: conditioner + Denoiser (+ head), returning per-sample losses."""

    def __init__(self, parts: Components):
        super().__init__()
        self.conditioner, self.denoiser, self.head = parts.conditioner, parts.denoiser, parts.head

    def forward(self, images, attrs, index, noise, sigma) -> dict[str, torch.Tensor]:
        cond = self.conditioner(attrs, index)
        kwargs = {} if cond is None else {"mapping_cond": cond}
        diffusion = self.denoiser.loss(images, noise, sigma, **kwargs)
        out = {"loss": diffusion, "diffusion": diffusion}
        if self.head is not None:
            out.update(self.head.losses(attrs))
            out["loss"] = diffusion + self.head.weight * out["head"]
        return out


def lr_lambda(cfg: dict) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to ``lr_final_frac``."""
    t = cfg["train"]
    warm, steps, final, shape = t["warmup_steps"], t["steps"], t["lr_final_frac"], t["lr_decay"]
    if shape not in ("constant", "cosine"):
        raise ValueError(f"train.lr_decay must be 'constant' or 'cosine', got '{shape}'")

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if shape == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def grid_rows(cfg: dict, parts: Components, n_rows: int = 6) -> list[str]:
    """Return the attribute sets of the sample grid: the config's, or those of the first dataset items."""
    rows = cfg["sample"]["grid_rows"]
    if rows:
        return list(rows)
    return [describe(parts.dataset[i][1], parts.attr_names) for i in range(min(n_rows, len(parts.dataset)))]


def write_grid(cfg: dict, parts: Components, ema: nn.Module, path: Path) -> None:
    """Sample the grid rows with the EMA model and write a captioned PNG."""
    s = cfg["sample"]
    rows = grid_rows(cfg, parts)
    attrs = torch.stack([parse_attrs(r, parts.attr_names) for r in rows]).repeat_interleave(s["grid_cols"], 0)
    images = generate(parts, attrs, sampler=s["sampler"], steps=s["steps"], cfg_scale=s["cfg_scale"], seed=s["seed"], model=ema)
    save_png(captioned_grid(list(images.split(s["grid_cols"])), rows), path)


def train(
    cfg: dict,
    run_dir: str | Path,
    *,
    resume: bool = False,  # Continue from the run's latest checkpoint.
    on_step: Callable[[int, dict], None] | None = None,  # Called after every step with (step, metrics).
    accelerator: Accelerator | None = None,
) -> dict:
    """Train a resolved config into ``run_dir``; return the last logged metrics."""
    run_dir = Path(run_dir)
    # cpu=True on CPU-only machines lets accelerate run torchrun/accelerate-launch processes as MULTI_CPU (gloo)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    t = cfg["train"]
    if accelerator.device.type == "cpu":  # accelerate launch / torchrun pin OMP_NUM_THREADS=1; use the cores
        torch.set_flush_denormal(True)  # denormal floats make CPU math slow; flushing them costs nothing here
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(t["cpu_threads"] or max(1, cores // local))
    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --name")

    torch.manual_seed(t["seed"])  # identical initial weights on every process
    parts = build(cfg)
    ema = copy.deepcopy(parts.denoiser).eval().requires_grad_(False)
    module = DiffusionTrainer(parts)
    opt = torch.optim.AdamW(module.parameters(), lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema_sched = K.utils.EMAWarmup(power=t["ema_power"], max_value=t["ema_max"])
    start = 0
    torch.manual_seed(t["seed"] * 1000 + 1 + rank)  # per-process noise, sigma and dropout streams
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        changed = [k for k in ("dataset", "model", "conditioner", "head", "denoiser") if state["config"][k] != cfg[k]]
        if changed:
            raise ValueError(f"{ckpt_path} was trained with different {', '.join(changed)} settings; resume with the "
                             f"run's own config ({run_dir / 'config.yaml'}) or start a new run")
        module.load_state_dict(state["model"])
        ema.inner_model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema_sched.load_state_dict(state["ema_sched"])
        if len(state["rng"]) != world:
            raise ValueError(f"{ckpt_path} was written by {len(state['rng'])} processes; resume it with as many, not {world}")
        torch.set_rng_state(state["rng"][rank])
        start = state["step"]
    module, opt = accelerator.prepare(module, opt)
    ema.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(module)

    metrics_file = run_dir / "metrics.jsonl"
    if main:
        for sub in ("checkpoints", "samples", "plots"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        write_json(run_dir / "dataset.json", dataset_info(parts.dataset))
        if metrics_file.exists():  # drop lines logged after the checkpoint we resume from
            kept = [l for l in metrics_file.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
            metrics_file.write_text("".join(l + "\n" for l in kept))
        accelerator.print(f"gmmcond: {K.utils.n_params(unwrapped.denoiser) / 1e6:.2f}M parameters, {world} process(es), "
                          f"steps {start}..{t['steps']}, run dir {run_dir}")

    sampler = StepBatchSampler(len(parts.dataset), t["batch_size"], t["seed"], start, t["steps"], rank, world)
    loader = DataLoader(parts.dataset, batch_sampler=sampler, num_workers=t["num_workers"],
                        generator=torch.Generator().manual_seed(t["seed"]))  # keeps the global RNG stream untouched
    schedule, device = parts.schedule, accelerator.device

    def checkpoint(step: int) -> None:
        rng = gather_object([torch.get_rng_state()]) if world > 1 else [torch.get_rng_state()]
        if main:
            state = {"step": step, "model": unwrapped.state_dict(), "ema": ema.inner_model.state_dict(),
                     "opt": opt.state_dict(), "sched": sched.state_dict(), "ema_sched": ema_sched.state_dict(),
                     "rng": list(rng), "config": cfg}
            save_checkpoint(run_dir, step, state, keep=t["keep_checkpoints"])
        accelerator.wait_for_everyone()

    last: dict = {}
    sums: dict[str, float] = {}
    count, tic = 0, time.time()
    bar = tqdm(total=t["steps"], initial=start, disable=not main, desc="train", dynamic_ncols=True)
    for step, (images, attrs, index) in enumerate(loader, start=start):
        images, attrs, index = images.to(device), attrs.to(device), index.to(device)
        noise = torch.randn_like(images)
        sigma = schedule.sample_sigmas(len(images)).to(device)
        module.train()
        losses = module(images, attrs, index, noise, sigma)
        loss = losses["loss"].mean()
        synced = accelerator.gather(loss.detach()[None]).mean()
        if not torch.isfinite(synced):
            good = latest_checkpoint(run_dir)
            where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"loss is {synced.item()} at step {step + 1}; training stopped before the optimiser step, and {where}. "
                f"Lower train.lr (now {t['lr']}) or raise train.warmup_steps, then resume with --resume.")
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if t["grad_clip"] > 0:
            accelerator.clip_grad_norm_(module.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        K.utils.ema_update(unwrapped.denoiser, ema, ema_sched.get_value())
        ema_sched.step()

        done = step + 1
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + accelerator.gather(value.detach().mean()[None]).mean().item()
        count += 1
        bar.update(1)
        if done % t["log_every"] == 0 or done == t["steps"]:
            last = {"step": done, **{k: v / count for k, v in sums.items()}, "lr": sched.get_last_lr()[0],
                    "sec_per_step": (time.time() - tic) / count, "peak_rss_mb": peak_rss_mb()}
            if main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            sums, count, tic = {}, 0, time.time()
        if on_step is not None:
            on_step(done, last)
        if done % t["checkpoint_every"] == 0 or done == t["steps"]:
            checkpoint(done)
        if main and ((t["grid_every"] and done % t["grid_every"] == 0) or done == t["steps"]):
            write_grid(cfg, parts, ema, run_dir / "samples" / f"grid_{done:07d}.png")
            plot_metrics(metrics_file, run_dir / "plots" / "loss.png", keys=[k for k in ("loss", "diffusion", "head_w1") if k in last])
    bar.close()
    check_in_sync(accelerator, unwrapped)
    if main:
        export_safetensors(run_dir / "ema.safetensors", ema.inner_model, cfg, dataset_info(parts.dataset), t["steps"])
    accelerator.wait_for_everyone()
    return last


def peak_rss_mb() -> float:
    """Return this process's peak resident memory in MiB (0 where the platform does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, AttributeError):
        return 0.0


def check_in_sync(accelerator: Accelerator, module: nn.Module) -> None:
    """Check that every process holds the same parameters (a DDP invariant); raise if not."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])
    sums = gather_object([(flat.sum().item(), flat.abs().sum().item(), (flat * flat).sum().item())])
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"parameters differ across processes: {sums}")
    accelerator.print(f"gmmcond: parameters identical across {accelerator.num_processes} processes")
