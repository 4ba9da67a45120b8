"""Benchmarks: samplers on the exact Gaussian-mixture testbed, and sampler wall time on the shapes model."""
from __future__ import annotations

import time
from pathlib import Path

import k_diffusion as K
import torch

from ..sampling.samplers import sample
from ..sampling.testbed import GaussianMixtureDenoiser, sliced_wasserstein
from ..utils import host_description

# (label, SAMPLERS node, model evaluations per step)
SAMPLER_SET = [
    ("x0_reproject r=1", {"type": "x0_reproject", "renoise": 1.0}, 1),
    ("x0_reproject r=0.5", {"type": "x0_reproject", "renoise": 0.5}, 1),
    ("x0_reproject r=0", {"type": "x0_reproject", "renoise": 0.0}, 1),
    ("euler", "euler", 1),
    ("euler_ancestral", "euler_ancestral", 1),
    ("heun", "heun", 2),
    ("dpm_2", "dpm_2", 2),
    ("dpmpp_2m", "dpmpp_2m", 1),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", 1),
]


def testbed_samplers(nfes=(5, 10, 20, 50, 100), n: int = 4000, d: int = 2, seed: int = 0) -> dict:
    """Sliced W1 to exact samples per sampler and budget of model evaluations, with the exact-vs-exact floor."""
    bed = GaussianMixtureDenoiser.default(d)
    gen = torch.Generator().manual_seed(seed)
    exact, exact2 = bed.sample(n, gen), bed.sample(n, gen)
    floor = sliced_wasserstein(exact, exact2)
    noise = torch.randn(n, d, generator=gen, dtype=torch.float64)
    true_w, true_s = bed.mode_stats(exact)
    table = {}
    for label, node, per_step in SAMPLER_SET:
        row = {}
        for nfe in nfes:
            steps = max(1, nfe // per_step) if per_step == 1 else max(1, (nfe + 1) // per_step)
            sigmas = K.sampling.get_sigmas_karras(steps, 0.002, 80.0).double()
            torch.manual_seed(seed)
            x = sample(node, bed, noise, sigmas)
            w, s = bed.mode_stats(x)
            row[nfe] = {"sw1": sliced_wasserstein(x, exact), "mode_weights": w.tolist(), "mode_spread": s.tolist()}
        table[label] = row
    return {"floor": floor, "true_mode_weights": true_w.tolist(), "true_mode_spread": true_s.tolist(), "table": table}


def renoise_sweep(steps_list=(10, 30, 100, 300), renoises=(0.0, 0.5, 1.0), n: int = 4000, seed: int = 0) -> dict:
    """x0_reproject against the truth for many step counts and renoise values: distance, mode weights, spread."""
    bed = GaussianMixtureDenoiser.default(2)
    gen = torch.Generator().manual_seed(seed)
    exact, exact2 = bed.sample(n, gen), bed.sample(n, gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out = {"floor": sliced_wasserstein(exact, exact2), "true": [v.tolist() for v in bed.mode_stats(exact)], "runs": []}
    for r in renoises:
        for steps in steps_list:
            torch.manual_seed(seed)
            x = sample({"type": "x0_reproject", "renoise": r}, bed, noise, K.sampling.get_sigmas_karras(steps, 0.002, 80.0).double())
            w, s = bed.mode_stats(x)
            out["runs"].append({"renoise": r, "steps": steps, "sw1": sliced_wasserstein(x, exact),
                                "mode_weights": w.tolist(), "mode_spread": s.tolist()})
    return out


def median_iqr(values: list[float]) -> dict:
    """Return the median and interquartile range of timings."""
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": q[1], "iqr": q[2] - q[0], "n": len(values)}


def sampler_step_time(parts, batch: int = 16, steps: int = 10, repeats: int = 15) -> dict:
    """Wall time per step of x0_reproject and k-diffusion's euler on the same model: interleaved rounds with
    the order alternating, median and IQR per sampler, and the ratio of medians."""
    size = parts.dataset.size
    attrs = torch.zeros(batch, len(parts.attr_names))
    cond = parts.conditioner.encode(attrs, parts.conditioner.sample_latents(batch)) if parts.conditioner.dim else None
    extra = {} if cond is None else {"mapping_cond": cond}
    sigmas = parts.schedule.sigmas(steps)
    noise = torch.randn(batch, 3, size, size)
    times = {"x0_reproject": [], "euler": []}
    names = list(times)
    with torch.no_grad():
        for name in names:  # warm-up
            sample(name, parts.denoiser, noise, sigmas, extra_args=extra)
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                sample(name, parts.denoiser, noise, sigmas, extra_args=extra)
                times[name].append((time.perf_counter() - t0) / steps)
    stats = {k: median_iqr(v) for k, v in times.items()}
    return {"sec_per_step": stats, "ratio_x0_reproject_to_euler": stats["x0_reproject"]["median"] / stats["euler"]["median"],
            "batch": batch, "steps": steps, "repeats": repeats}


def plot_samplers(result: dict, out) -> None:
    """Plot sliced W1 against model evaluations for every sampler, with the noise floor."""
    from ..visualize import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, row in result["table"].items():
        nfes = sorted(row, key=int)
        ax.plot([int(n) for n in nfes], [row[n]["sw1"] for n in nfes], marker="o", label=label,
                linestyle="-" if label.startswith("x0") else "--")
    ax.axhline(result["floor"], color="k", linewidth=0.8, label="exact vs exact (noise floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("sliced W1 to exact samples")
    ax.set_title("Samplers on the exact 3-mode Gaussian mixture (d=2)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """Render the sampler table as Markdown (sliced W1; the floor in the caption)."""
    nfes = sorted(next(iter(result["table"].values())), key=int)
    lines = ["| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for label, row in result["table"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[n]['sw1']:.4f}" for n in nfes) + " |")
    lines.append(f"\nexact-vs-exact noise floor: {result['floor']:.4f}")
    return "\n".join(lines)


TRAIN_ARMS = {  # name: (what, precision, compiled)
    "a_plain_kdiffusion_fp32": ("plain k-diffusion image_v1 + Denoiser, zero mapping_cond", "fp32", False),
    "b_gmmcond_fp32": ("gmmcond default recipe (gmm_attrs, coordinate channels)", "fp32", False),
    "c_gmmcond_bf16": ("gmmcond, bf16 autocast", "bf16", False),
    "d_gmmcond_compiled_fp32": ("gmmcond, torch.compile", "fp32", True),
    "e_gmmcond_compiled_bf16": ("gmmcond, torch.compile + bf16 autocast", "bf16", True),
}


def _plain_step(cfg: dict):
    """Arm (a): k-diffusion's own image_v1 and Denoiser, built without gmmcond, same shape and sizes."""
    import k_diffusion as K

    from ..modeling.conditioners import GMMAttrs
    from ..modeling.models import image_v1_config

    m = cfg["model"]
    dim = GMMAttrs(11, **{k: v for k, v in cfg["conditioner"].items() if k != "type"}).dim
    torch.manual_seed(0)
    # the recipe's k-diffusion config, built by k-diffusion alone (no coordinate-map wrapper: zeros go in instead)
    inner = K.config.make_model(image_v1_config(dim, **{k: v for k, v in m.items() if k != "type"}))
    denoiser = K.layers.Denoiser(inner, sigma_data=cfg["denoiser"]["sigma_data"], weighting="karras")
    opt = torch.optim.AdamW(denoiser.parameters(), 1e-4, **{cfg["train"]["adamw_impl"]: True})  # every arm: the trainer's

    def step(images, attrs, index, noise, sigma):
        kwargs = {"mapping_cond": images.new_zeros(len(images), dim)}
        if m["coord_channels"]:
            kwargs["unet_cond"] = images.new_zeros(len(images), 2, *images.shape[-2:])
        loss = denoiser.loss(images, noise, sigma, **kwargs).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _gmmcond_step(cfg: dict, precision: str, compiled: bool):
    """Arms (b)-(e): the trainer's module (conditioner + Denoiser), under autocast and/or torch.compile."""
    from ..modeling.precision import autocast
    from ..modeling.objective import TrainingObjective
    from ..modeling.build import build

    torch.manual_seed(0)
    parts = build(cfg)
    if compiled:
        parts.denoiser.inner_model.compile()
    module = TrainingObjective(parts).train()
    opt = torch.optim.AdamW(module.parameters(), 1e-4, **{cfg["train"]["adamw_impl"]: True})

    def step(images, attrs, index, noise, sigma):
        with autocast("cpu", precision):
            loss = module(images, attrs, index, noise, sigma)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, parts


def _batch(parts, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(parts.dataset), (batch,), generator=gen).tolist()
    items = [parts.dataset[i] for i in idx]
    images, attrs = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
    return images, attrs, torch.tensor(idx), torch.randn(images.shape, generator=gen), parts.schedule.sample_sigmas(batch, gen)


def step_flops(step, batch) -> float:
    """Count the FLOPs of one training step (forward and backward) with torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(*batch)
    return float(counter.get_total_flops())


def peak_gflops(repeats: int = 10) -> dict:
    """Measure this machine's fp32 and bf16 matmul and conv throughput (best of ``repeats``), GFLOP/s."""
    out = {}
    n = 1024
    conv_x, conv_w = torch.randn(64, 64, 32, 32), torch.randn(64, 64, 3, 3)
    conv_flops = 2 * 64 * 64 * 32 * 32 * 64 * 9
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        x, w = conv_x.to(dtype), conv_w.to(dtype)
        for kind, fn, flops in (("matmul", lambda: a @ b, 2 * n ** 3),
                                ("conv", lambda: torch.nn.functional.conv2d(x, w, padding=1), conv_flops)):
            fn()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_{kind}"] = flops / best / 1e9
    return out


def _peak_rss_child(cfg: dict, arm: str, steps: int, queue) -> None:
    from ..utils import peak_rss_mb

    _, precision, compiled = TRAIN_ARMS[arm]
    step, parts = _gmmcond_step(cfg, precision, compiled)
    if arm.startswith("a_"):
        step = _plain_step(cfg)
    for s in range(steps):
        step(*_batch(parts, cfg["train"]["batch_size"], s))
    queue.put(peak_rss_mb())


def train_step_time(cfg: dict, *, steps: int = 4, rounds: int = 15, warmup: int = 3, arms=None, memory: bool = True,
                    log=print) -> dict:
    """Time a training step of every arm in TRAIN_ARMS: warm-up (compilation excluded), then ``rounds`` interleaved
    round-robin rounds of ``steps`` steps with a rotating order; median and IQR per arm, FLOPs per step and the
    machine's matmul/conv peaks measured in the same run."""
    from ..modeling.build import resolve_sigma_data

    cfg = resolve_sigma_data(cfg)  # measured once, not in every arm (k-diffusion's own arm needs the number)
    arms = list(arms or TRAIN_ARMS)
    batch_size = cfg["train"]["batch_size"]
    steppers, parts = {}, None
    for arm in arms:
        _, precision, compiled = TRAIN_ARMS[arm]
        if arm.startswith("a_"):
            steppers[arm] = _plain_step(cfg)
        else:
            steppers[arm], parts = _gmmcond_step(cfg, precision, compiled)
    if parts is None:
        parts = _gmmcond_step(cfg, "fp32", False)[1]
    batches = [_batch(parts, batch_size, s) for s in range(steps)]
    warm = {}
    for arm in arms:
        t0 = time.perf_counter()
        for w in range(warmup):
            steppers[arm](*batches[w % steps])
        warm[arm] = time.perf_counter() - t0
        log(f"  warm-up {arm}: {warm[arm]:.1f} s (compilation included)")
    flops = step_flops(steppers[arms[0]], batches[0])  # the same network in every arm
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms[r % len(arms):] + arms[: r % len(arms)]:
            t0 = time.perf_counter()
            for b in batches:
                steppers[arm](*b)
            times[arm].append((time.perf_counter() - t0) / steps)
    peaks = peak_gflops()
    result = {"batch": batch_size, "steps_per_round": steps, "rounds": rounds, "flops_per_step": flops,
              "threads": torch.get_num_threads(), "host": host_description(), "peak_gflops": peaks,
              "warmup_seconds": warm, "arms": {}}
    for arm in arms:
        stats = median_iqr(times[arm])
        result["arms"][arm] = {"what": TRAIN_ARMS[arm][0], "sec_per_step": stats, "gflops": flops / stats["median"] / 1e9}
    plain = next((a for a in arms if a.startswith("a_")), None)
    if plain:
        base = result["arms"][plain]["sec_per_step"]["median"]
        for arm in arms:
            result["arms"][arm]["ratio_to_plain"] = result["arms"][arm]["sec_per_step"]["median"] / base
        fastest = min(arms, key=lambda a: result["arms"][a]["sec_per_step"]["median"])
        result["fastest"] = fastest
        result["speedup_fastest_vs_plain"] = base / result["arms"][fastest]["sec_per_step"]["median"]
    if memory:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        peaks_mb = {}
        for arm in [a for a in arms if a[0] in "ab"]:
            q = ctx.Queue()
            p = ctx.Process(target=_peak_rss_child, args=(cfg, arm, 3, q))
            p.start()
            peaks_mb[arm] = q.get()
            p.join()
        result["peak_rss_mb"] = peaks_mb
    return result


def train_table(result: dict) -> str:
    """Render the training benchmark as Markdown."""
    lines = ["| arm | step time, median (IQR) | GFLOP/s | vs plain k-diffusion |", "|---|---|---|---|"]
    for arm, r in result["arms"].items():
        st = r["sec_per_step"]
        lines.append(f"| {arm}: {r['what']} | {st['median'] * 1e3:.1f} ms ({st['iqr'] * 1e3:.1f}) | {r['gflops']:.0f} | "
                     f"{r.get('ratio_to_plain', float('nan')):.3f} |")
    p = result["peak_gflops"]
    host = f"{result['host']}; " if "host" in result else ""  # results measured before benchmarks named it
    lines.append(f"\n{host}FLOPs per step {result['flops_per_step'] / 1e9:.2f} G (batch {result['batch']}, FlopCounterMode); "
                 f"machine peaks, GFLOP/s: fp32 matmul {p['fp32_matmul']:.0f}, fp32 conv {p['fp32_conv']:.0f}, "
                 f"bf16 matmul {p['bf16_matmul']:.0f}, bf16 conv {p['bf16_conv']:.0f}")
    if "speedup_fastest_vs_plain" in result:
        lines.append(f"fastest: {result['fastest']}, speed-up vs plain k-diffusion fp32: {result['speedup_fastest_vs_plain']:.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ quality over time

def training_minutes(metrics: list[dict]) -> dict[int, float]:
    """Cumulative training wall time (minutes) at each logged step of a metrics.jsonl: the sum of each log
    interval's ``sec_per_step`` times its steps (compilation is inside the first interval)."""
    out, total, last = {}, 0.0, 0
    for m in metrics:
        total += m["sec_per_step"] * (m["step"] - last)
        last = m["step"]
        out[m["step"]] = total / 60
    return out


def steady_minutes(metrics: list[dict]) -> float:
    """A run's training minutes at its median step time (steps x the median of its logged ``sec_per_step``): what it
    takes on a machine doing nothing else, where :func:`training_minutes` also counts time lost to other work."""
    from ..io import median_sec_per_step

    return median_sec_per_step(metrics, "none") * metrics[-1]["step"] / 60


def quality_over_time(cfg: dict, run_dir, *, every: int = 1000, n: int = 256, per_set: int = 48, log=print,
                      train_first: bool = True) -> dict:
    """Train ``cfg`` once (resuming a killed run) keeping a checkpoint every ``every`` steps, then evaluate
    the EMA weights of each with the frozen evaluator (n samples, 6 attribute sets x ``per_set`` for the
    per-set metrics). A mark already evaluated at the same (step, n, per_set) is read back, not redone.
    ``train_first=False`` evaluates the marks a stopped run has so far."""

    from ..engine.trainer import train
    from ..eval.evaluate import EvalSize, eval_summary, evaluate_run
    from ..io import ResultLog, checkpoint_step, list_checkpoints, median_sec_per_step, read_metrics

    run_dir = Path(run_dir)
    steps = cfg["train"]["steps"]
    cfg = dict(cfg, train=dict(cfg["train"], checkpoint_every=every, keep_checkpoints=steps // every + 2))
    if train_first and not (run_dir / "ema.safetensors").exists():
        train(cfg, run_dir, resume=(run_dir / "checkpoints" / "latest").exists())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    minutes = training_minutes(metrics)
    results = ResultLog(run_dir / "quality.jsonl")
    marks = []
    for path in list_checkpoints(run_dir):
        step = checkpoint_step(path)
        if step % every and step != steps:
            continue

        def compute(path=path, step=step) -> dict:
            log(f"quality: evaluating step {step}")
            ev = evaluate_run(run_dir, None, EvalSize(n=n, per_set=per_set, memorisation=0), checkpoint=path,
                              tag=f"step{step:07d}", progress=False)
            return eval_summary(ev)

        record = results.once({"step": step, "n": n, "per_set": per_set}, compute)
        marks.append(dict(record, minutes=minutes.get(step)))
    return {"config": cfg, "every": every, "n": n, "per_set": per_set, "marks": marks,
            "sec_per_step_median": median_sec_per_step(metrics)}


def plot_quality(result: dict, out) -> None:
    """Conformity, defects, per-set recall / coverage (as a fraction of their real references) and the
    spread ratio against training minutes (bottom axis) and steps (top axis)."""
    import numpy as np

    from ..visualize import pyplot, save_figure

    plt = pyplot()

    from ..eval.evaluate import SPREAD_BAND

    marks = result["marks"]
    x, steps = [m["minutes"] for m in marks], [m["step"] for m in marks]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [m["all_attributes_correct"] for m in marks], "o-", label="all attributes correct")
    axes[0].plot(x, [m["defect_rate"] for m in marks], "s-", label="defects")
    axes[0].axhline(0.9, ls=":", c="C0"), axes[0].axhline(0.05, ls=":", c="C1")
    axes[1].plot(x, [m["set_recall"] / m["set_recall_real_reference"] for m in marks], "o-", label="per-set recall / real")
    axes[1].plot(x, [m["set_coverage"] / m["set_coverage_real_reference"] for m in marks], "s-", label="per-set coverage / real")
    axes[1].axhline(0.85, ls=":", c="k")
    axes[2].plot(x, [m["set_mean_spread_ratio"] for m in marks], "o-", label="nuisance spread ratio")
    axes[2].axhspan(*SPREAD_BAND, color="g", alpha=0.1, label="target band")
    for ax in axes:
        ax.set_xlabel("training minutes (compile included)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda v: np.interp(v, x, steps), lambda v: np.interp(v, steps, x)))
        top.set_xlabel("steps", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)


def quality_table(result: dict) -> str:
    """The quality-over-time marks as Markdown: the headline numbers at each evaluated step."""
    lines = ["| step | minutes | conformity | defects | per-set recall / real | per-set coverage / real | spread | "
             "accuracy | FD |", "|---|---|---|---|---|---|---|---|---|"]
    for m in result["marks"]:
        lines.append(f"| {m['step']} | {m['minutes']:.1f} | {m['all_attributes_correct']:.3f} | {m['defect_rate']:.3f} | "
                     f"{m['set_recall'] / m['set_recall_real_reference']:.2f}x | "
                     f"{m['set_coverage'] / m['set_coverage_real_reference']:.2f}x | {m['set_mean_spread_ratio']:.3f} | "
                     f"{m['attr_accuracy']:.3f} | {m['fd']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ recipe probes

# Overrides on the default recipe that keep its training minutes (same step cost and steps, or batch x steps
# constant): what learns more per minute. Each trains once with quality_over_time (two marks); the default
# itself is `benchmark.py quality`.
PROBES = {
    "lr 4e-3": ["train.lr=4e-3"],
    "lr 1e-3": ["train.lr=1e-3"],
    "soft-min-snr weighting": ["denoiser.loss=soft_min_snr"],
    "sigma density loc -0.6": ["schedule.loc=-0.6"],
    "batch 32 x 12000 steps": ["train.batch_size=32", "train.steps=12000", "train.warmup_steps=200"],
    # the soft-min-SNR objective by importance sampling: sigma drawn from the log-normal times the weighting,
    # unit weight (schedules.KarrasSchedule, tilt), so no batch slot goes to a near-zero weight; measured: far
    # worse (conformity 0.33 against 0.84); likely AdamW's per-parameter normalisation breaks the equivalence. The
    # tilt needs sigma_data as a number: the 0.5 it was measured at
    "importance-sampled soft-min-snr": ["denoiser.sigma_data=0.5", "schedule.tilt=soft_min_snr", "denoiser.loss=karras"],
    # Karras weighting with the gradient-norm clip off: is it the weighting or the clip? (soft-min-SNR's
    # gradient norms stay far below the 1.0 clip after the first 50 steps, metrics.jsonl grad_clipped)
    "karras weighting, no clip": ["denoiser.loss=karras", "train.grad_clip=0"],
    # more training draws at high sigma, where composition is decided (the tilt above starves both tails)
    "soft-min-snr, sigma density loc -0.6": ["denoiser.loss=soft_min_snr", "schedule.loc=-0.6"],
    # the weighting learned instead of chosen: the Karras loss over a learned variance (k-diffusion's
    # DenoiserWithVariance; EDM2's uncertainty weighting, per sample rather than per noise level)
    "uncertainty weighting": ["model.has_variance=true", "denoiser.loss=uncertainty"],
    # issue 41, learning per step: Immiscible Diffusion's batch-level noise-to-image assignment (Li et al. 2024);
    # k-diffusion's own image_v1 optimiser betas and EMA schedule (k_diffusion/config.py defaults)
    "immiscible noise assignment": ["train.immiscible=true"],
    "adamw betas 0.95, 0.999 (k-diffusion image_v1)": ["train.betas=[0.95,0.999]"],
    "ema power 2/3, max 0.9999 (k-diffusion)": ["train.ema_power=0.6667", "train.ema_max=0.9999"],
}


def probe_dir(out, name: str, overrides: list[str]):
    """The run folder of one probe: its name and a hash of its overrides (other overrides, another folder)."""

    from .runner import arm_slug, run_folder

    return run_folder(Path(out), f"probe_{arm_slug(name)}", " ".join(overrides))


def recipe_probes(out, names=None, *, n: int = 256, log=print) -> dict:
    """Train and evaluate each probe (:data:`PROBES`, or ``names`` of them) in turn; resumable (a finished
    probe is read back, a killed one resumes). Returns per probe its overrides, marks and step time."""
    from ..config import load_config
    from ..errors import ConfigError

    unknown = [name for name in names or () if name not in PROBES]
    if unknown:
        raise ConfigError(f"unknown probe(s) {unknown}; PROBES has: {', '.join(repr(p) for p in PROBES)}")
    results = {}
    for name in names or PROBES:
        overrides = PROBES[name]
        cfg = load_config("shapes", overrides)
        every = cfg["train"]["steps"] // 2
        log(f"probe '{name}': {' '.join(overrides) or '(the default recipe)'}")
        res = quality_over_time(cfg, probe_dir(out, name, overrides), every=every, n=n, log=log)
        results[name] = {"overrides": overrides, "marks": res["marks"], "sec_per_step_median": res["sec_per_step_median"]}
    return results


def probes_table(results: dict) -> str:
    """One row per probe and evaluated mark: its overrides, minutes and the headline metrics."""
    lines = ["| probe | overrides | step | minutes | conformity | defects | per-set recall / real | "
             "per-set coverage / real | spread | accuracy | FD |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for m in r["marks"]:
            lines.append(f"| {name} | `{' '.join(r['overrides']) or '-'}` | {m['step']} | {m['minutes']:.1f} | "
                         f"{m['all_attributes_correct']:.3f} | {m['defect_rate']:.3f} | "
                         f"{m['set_recall'] / m['set_recall_real_reference']:.2f}x | "
                         f"{m['set_coverage'] / m['set_coverage_real_reference']:.2f}x | {m['set_mean_spread_ratio']:.3f} | "
                         f"{m['attr_accuracy']:.3f} | {m['fd']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ step profile

PHASES = ("data", "forward", "loss_check", "backward", "optimizer", "ema")
OP_GROUPS = (  # first match wins; matched against the lower-cased op name
    ("convolutions and matmuls", ("conv", "mm", "linear", "matmul", "baddbmm")),
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("compiled graphs (fused kernels)", ("compiled", "inductor", "triton", "cpp_fused", "graph_")),
    ("norms and elementwise", ("",)),
)


def profile_training(cfg: dict, *, warmup: int = 5, active: int = 20) -> dict:
    """Profile ``active`` steps of the real training loop (after ``warmup`` steps, compilation included there)
    with torch.profiler: milliseconds per step in each phase the trainer labels (data, forward, loss check,
    backward, optimiser, EMA), the rest of the wall time as Python / loop overhead, and the operators'
    self time by kind (convolutions and matmuls, attention, compiled graphs, norms and elementwise)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile, schedule

    from ..engine.trainer import train

    steps = warmup + active + 1  # the last step (final checkpoint, grid) falls outside the window
    cfg = dict(cfg, train=dict(cfg["train"], steps=steps, grid_every=0, checkpoint_every=10 ** 9, log_every=10 ** 9))
    stamps, captured = {}, []
    window = schedule(wait=0, warmup=warmup, active=active, repeat=1)
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU], schedule=window,
                                                       on_trace_ready=lambda p: captured.append(p.key_averages())) as prof:
        def on_step(step, _):
            stamps[step] = time.perf_counter()
            prof.step()

        train(cfg, f"{tmp}/run", on_step=on_step)
    wall_ms = (stamps[warmup + active] - stamps[warmup]) / active * 1e3  # the window: the ends of steps W and W + A
    events = captured[0]
    phases = {p: 0.0 for p in PHASES}
    kinds = {k: 0.0 for k, _ in OP_GROUPS}
    for e in events:
        if e.key.startswith("gmmcond::"):
            name = e.key.split("::", 1)[1]
            if name in phases:
                phases[name] += e.cpu_time_total / active / 1e3
            continue
        if e.key.startswith("ProfilerStep"):
            continue
        low = e.key.lower()
        kind = next(k for k, words in OP_GROUPS if any(w in low for w in words))
        kinds[kind] += e.self_cpu_time_total / active / 1e3
    overhead = wall_ms - sum(phases.values())
    return {"config": cfg["name"], "compile": cfg["train"]["compile"], "precision": cfg["train"]["precision"],
            "active_steps": active, "wall_ms_per_step": wall_ms, "phases_ms": phases,
            "python_and_loop_overhead_ms": overhead, "op_self_ms_by_kind": kinds, "threads": torch.get_num_threads()}


def profile_table(results: list[dict]) -> str:
    """Profiles as Markdown: one column per profiled setting."""
    head = " | ".join(f"{r['config']}, {'compiled' if r['compile'] else 'eager'}, {r['precision']}" for r in results)
    lines = [f"| ms per step | {head} |", "|---|" + "---|" * len(results)]
    rows = [("wall time", lambda r: r["wall_ms_per_step"])]
    rows += [(f"phase: {p}", lambda r, p=p: r["phases_ms"][p]) for p in PHASES]
    rows += [("Python and loop overhead (wall - phases)", lambda r: r["python_and_loop_overhead_ms"])]
    rows += [(f"ops, self time: {k}", lambda r, k=k: r["op_self_ms_by_kind"][k]) for k, _ in OP_GROUPS]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(f"{get(r):.1f} ({100 * get(r) / r['wall_ms_per_step']:.0f}%)" for r in results) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- samplers at a call budget

# Model evaluations per step of each sampler (a CFG step doubles it); k-diffusion's multistep solvers reuse the
# previous step's output, its second-order single-step ones evaluate twice (the last step once).
CALLS_PER_STEP = {"heun": 2, "dpm_2": 2, "dpm_2_ancestral": 2, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2}

# sampling settings compared at the same trained weights: the recipe's, the one it had before, ones of 30 model calls
# a sample or fewer, and guidance in a limited interval
SAMPLER_BUDGET = {
    "x0_reproject 0.5, 100 steps, CFG 2": {"sampler": {"type": "x0_reproject", "renoise": 0.5}, "steps": 100,
                                           "cfg_scale": 2.0},
    "x0_reproject 0.5, 100 steps, CFG 1.5": {"sampler": {"type": "x0_reproject", "renoise": 0.5}, "steps": 100,
                                             "cfg_scale": 1.5},
    "x0_reproject 0.5, 15 steps, CFG 1.5": {"sampler": {"type": "x0_reproject", "renoise": 0.5}, "steps": 15, "cfg_scale": 1.5},
    "x0_reproject 0.5, 30 steps, CFG 1": {"sampler": {"type": "x0_reproject", "renoise": 0.5}, "steps": 30, "cfg_scale": 1.0},
    "dpmpp_2m, 15 steps, CFG 1.5": {"sampler": "dpmpp_2m", "steps": 15, "cfg_scale": 1.5},
    "dpmpp_2m_sde, 15 steps, CFG 1.5": {"sampler": "dpmpp_2m_sde", "steps": 15, "cfg_scale": 1.5},
    "dpmpp_3m_sde, 15 steps, CFG 1.5": {"sampler": "dpmpp_3m_sde", "steps": 15, "cfg_scale": 1.5},
    # guidance in a limited interval (Kynkäänniemi et al. 2024; (0.28, 5.42] is their EDM2-S interval, sigma_data 0.5
    # as here): guidance off at the highest sigmas, where it narrows each set, so it can be stronger elsewhere; a
    # 16x16 image loses its structure at lower sigmas than their 64x64 latents, hence also (0.28, 2]
    "x0_reproject 0.5, 100 steps, CFG 1.5 in (0.28, 5.42]": {"sampler": {"type": "x0_reproject", "renoise": 0.5},
                                                            "steps": 100, "cfg_scale": 1.5, "cfg_interval": (0.28, 5.42)},
    "x0_reproject 0.5, 100 steps, CFG 2.5 in (0.28, 5.42]": {"sampler": {"type": "x0_reproject", "renoise": 0.5},
                                                            "steps": 100, "cfg_scale": 2.5, "cfg_interval": (0.28, 5.42)},
    "x0_reproject 0.5, 100 steps, CFG 2.5 in (0.28, 2]": {"sampler": {"type": "x0_reproject", "renoise": 0.5},
                                                         "steps": 100, "cfg_scale": 2.5, "cfg_interval": (0.28, 2.0)},
    "dpmpp_2m_sde, 20 steps, CFG 2.5 in (0.28, 5.42]": {"sampler": "dpmpp_2m_sde", "steps": 20, "cfg_scale": 2.5,
                                                        "cfg_interval": (0.28, 5.42)},
}


# the default recipe's sampling (registry/shapes.yaml's `sample`): what `recipes` and `peer` score every run with,
# whatever the run's own config says, so runs trained before a change of the recipe's sampling compare with today's
RECIPE_SETTING = "x0_reproject 0.5, 100 steps, CFG 2"
# the names of settings in results logged before the recipe's guidance rose to 2 (RESULTS.md), still accepted
FORMER_NAMES = {"x0_reproject 0.5, 100 steps, CFG 1.5 (recipe)": "x0_reproject 0.5, 100 steps, CFG 1.5"}


def model_calls(settings, sigmas=None) -> int:
    """Model evaluations a sample costs under ``settings`` (a SamplingSettings): steps times the sampler's calls
    per step, doubled under classifier-free guidance (the conditional and the null branch); with a guidance
    interval, doubled only at the steps whose sigma (of the sampling ``sigmas``, the run's schedule) lies in it
    (for a two-call sampler both calls counted at the step's first sigma)."""
    name = settings.sampler if isinstance(settings.sampler, str) else settings.sampler["type"]
    per_step = CALLS_PER_STEP.get(name, 1)
    if settings.cfg_scale == 1:
        return settings.steps * per_step
    if not settings.cfg_interval:
        return 2 * settings.steps * per_step
    if sigmas is None:
        raise ValueError("the model calls of a guidance interval depend on the sampling sigmas: pass the run's")
    lo, hi = settings.cfg_interval
    guided = sum(1 for sigma in list(map(float, sigmas))[:settings.steps] if lo < sigma <= hi)
    return (settings.steps + guided) * per_step


def run_sigmas(run, steps: int):
    """The sampling sigmas of a trained run's schedule at ``steps`` steps."""
    from ..config import load_config
    from ..registry import SCHEDULES

    return SCHEDULES.build(load_config(Path(run) / "config.yaml")["schedule"]).sigmas(steps)


# train settings that leave the trained weights as they are (up to the threads' rounding), beside the experiments'
# BOOKKEEPING: runs differing only in them are seeds of one recipe
RECIPE_NEUTRAL = ("train.cpu_threads", "train.num_workers", "train.log_every", "train.log_with", "train.posthoc_ema",
                  "train.posthoc_every")


def recipe_groups(runs: list) -> dict[str, list]:
    """Trained runs grouped by recipe: runs whose configs agree but for their name, ``train.seed`` and what does not
    change the training (``RECIPE_NEUTRAL`` and the experiments' ``BOOKKEEPING``: threads, logging, checkpoints,
    post-hoc EMA tracks; the history of a resume aside)
    are seeds of one recipe (a ``train.minutes`` run by its budget and step cap, not the steps fitted to it); each group
    named by what its run folders share (``shapes_s0``, ``shapes_s1`` ->
    ``shapes``; else by what the config names share), with the config's hash where two groups would share a name."""
    import hashlib
    import json
    import os

    from ..config import load_config
    from .runner import BOOKKEEPING

    neutral = {*RECIPE_NEUTRAL, *(k for k in BOOKKEEPING if k.startswith("train."))}
    groups: dict[str, list] = {}
    for run in map(Path, runs):
        cfg = load_config(run / "config.yaml")
        recipe = {k: v for k, v in cfg.items() if k not in ("name", "history")}
        recipe["train"] = {k: v for k, v in cfg["train"].items() if k != "seed" and f"train.{k}" not in neutral}
        if cfg["train"].get("minutes"):  # a budgeted run's steps were fitted to its machine: its recipe has the cap
            recipe["train"]["steps"] = next((h["fitted"]["train.steps"]["from"] for h in cfg.get("history", [])
                                             if "fitted" in h), cfg["train"]["steps"])
        groups.setdefault(json.dumps(recipe, sort_keys=True, default=str), []).append((run, cfg))
    named: dict[str, list] = {}
    for key, members in groups.items():
        shared = next(filter(None, (os.path.commonprefix(names).rstrip("_0123456789").removesuffix("_s") for names in
                                    ([run.name for run, _ in members], [cfg["name"] for _, cfg in members]))), "")
        name = shared or members[0][1]["name"]
        if name in named:
            name = f"{name} ({hashlib.sha1(key.encode()).hexdigest()[:8]})"
        named[name] = members
    return named


def recipes_compared(runs: list, *, n: int = 512, log=print) -> dict:
    """Trained runs of several recipes (seeds of each; grouped by :func:`recipe_groups`), each scored as
    :func:`sampler_budget` scores the default recipe's sampling (``RECIPE_SETTING``, whatever the run's own
    ``sample`` section says; read back from RUN/sampler_budget.jsonl where it is there); seeds paired
    by ``train.seed``, with each run's training minutes at its median step time and its steps."""
    from ..io import read_metrics
    from ..sampling.settings import SamplingSettings
    from .runner import summarise_records

    setting = RECIPE_SETTING
    calls = model_calls(SamplingSettings(**SAMPLER_BUDGET[setting]))
    settings = {}
    for name, members in recipe_groups(runs).items():
        recs = []
        for run, cfg in members:
            rec = sampler_budget([run], [setting], n=n, log=log)["settings"][setting]["per_seed"][0]
            recs.append({**rec, "seed": cfg["train"]["seed"], "train_steps": rec["step"],
                         "minutes": steady_minutes(read_metrics(run / "metrics.jsonl"))})
        settings[name] = {"model_calls": calls, **summarise_records(recs)}
    return {"runs": [str(r) for r in runs], "n": n, "setting": setting, "compared": "recipe", "settings": settings}


def timed_evaluation(run, settings, n: int, tag: str, weights: str = "ema") -> dict:
    """One evaluation of a trained run at the evaluation's defaults but ``n`` (``launch/evaluate.py --tag``), its
    headline numbers with its wall time and step: a record of :func:`sampler_budget` and :func:`ema_lengths`."""
    from ..eval.evaluate import EvalSize, eval_summary, evaluate_run

    tic = time.time()
    ev = evaluate_run(run, settings, EvalSize(n=n), weights=weights, tag=tag, progress=False)
    return {"eval_seconds": time.time() - tic, "step": ev["step"], **eval_summary(ev)}


def sampler_budget(runs: list, names=None, *, n: int = 512, log=print) -> dict:
    """Evaluate each of ``SAMPLER_BUDGET`` (or ``names`` of them) on each trained run (seeds of one recipe) at the
    evaluation's defaults (n samples, 6 sets x 48, memorisation on 256 rows); per setting its model calls a sample
    and mean +- std over the runs of the headline numbers and of the evaluation's wall time. Resumable: each (run,
    setting) lands in RUN/sampler_budget.jsonl."""

    from ..io import ResultLog
    from ..sampling.settings import SamplingSettings
    from .runner import arm_slug, select_arms, summarise_records

    result = {"runs": [str(r) for r in runs], "n": n, "settings": {}}
    names = [FORMER_NAMES.get(name, name) for name in names or ()]
    for name, overrides in select_arms(SAMPLER_BUDGET, names).items():
        records = []
        for run in map(Path, runs):
            def compute(run=run, name=name, overrides=overrides) -> dict:
                log(f"sampler budget: {run} / {name}")
                return timed_evaluation(run, overrides, n, f"budget_{arm_slug(name)}")

            rec = ResultLog(run / "sampler_budget.jsonl").once({"setting": name, "n": n}, compute)
            records.append({**rec, "seed": len(records)})
        settings = SamplingSettings(**overrides)
        result["settings"][name] = {"overrides": overrides, **summarise_records(records),
                                    "model_calls": model_calls(settings, run_sigmas(runs[0], settings.steps))}
    return result


# ema-lengths' default post-hoc sigma_rel: between and around EDM2's two tracks, where the snapshots' profiles fit the
# target's closely (a profile residual of about 0.01 to 0.04 at one snapshot every 500 of 6000 steps)
EMA_LENGTHS = (0.05, 0.08, 0.1, 0.15, 0.2)


def ema_lengths(runs: list, sigma_rels=EMA_LENGTHS, *, n: int = 512, log=print) -> dict:
    """The EMA length chosen after training (EDM2's post-hoc EMA; runs trained with ``train.posthoc_ema``): each run
    evaluated with its training EMA (k-diffusion's ``EMAWarmup``, what sampling uses), then with a power-function EMA
    of each ``sigma_rel`` reconstructed from its tracks, all with the run's own sampler at the evaluation's defaults;
    tabulated as :func:`sampler_budget` is, each length paired by run against the training EMA. Resumable: each
    (run, weights) lands in RUN/ema_lengths.jsonl."""
    from ..config import load_config
    from ..engine.posthoc_ema import ema_warmup_sigma_rel, posthoc_fit
    from ..io import ResultLog
    from ..modeling.runs import posthoc_sigma_rel
    from ..sampling.settings import SamplingSettings
    from .runner import summarise_records

    choices = {"training EMA (EMAWarmup)": "ema", **{f"post-hoc EMA, sigma_rel {s:g}": f"posthoc:{s:g}" for s in sigma_rels}}
    cfg = load_config(Path(runs[0]) / "config.yaml")
    calls = model_calls(SamplingSettings.from_config(cfg["sample"]), run_sigmas(runs[0], cfg["sample"]["steps"]))
    t = cfg["train"]
    result = {"runs": [str(r) for r in runs], "n": n, "settings": {},
              "training_ema_sigma_rel": ema_warmup_sigma_rel(t["ema_power"], t["ema_max"], t["steps"])}
    for name, weights in choices.items():
        records = []
        for run in map(Path, runs):
            def compute(run=run, name=name, weights=weights) -> dict:
                log(f"ema lengths: {run} / {name}")
                return timed_evaluation(run, None, n, f"ema_{weights.replace(':', '')}", weights)

            rec = ResultLog(run / "ema_lengths.jsonl").once({"weights": weights, "n": n}, compute)
            sigma_rel = posthoc_sigma_rel(weights)
            fit = {} if sigma_rel is None else {"profile_residual": posthoc_fit(run, sigma_rel)["profile_residual"]}
            records.append({**rec, "seed": len(records), **fit})
        result["settings"][name] = {"weights": weights, **summarise_records(records), "model_calls": calls}
    return result


# ------------------------------------------------------------------------------ processes on a small CPU

def _steady_sec_per_step(run) -> float:
    """The median ``sec_per_step`` of a run's second half of logged steps (a short timing run's compiling and
    warm-up are more than its first interval)."""
    from ..io import median_sec_per_step, read_metrics

    return median_sec_per_step(read_metrics(Path(run) / "metrics.jsonl"), "half")


def step_seconds_now(cfg: dict, steps: int = 150) -> float:
    """Seconds a training step of ``cfg`` takes on this machine as it is now: ``steps`` steps from scratch in a
    temporary folder (compiling in the first of them), the median of the second half of the logged step times."""
    import tempfile

    from ..engine.trainer import train

    cfg = dict(cfg, train=dict(cfg["train"], steps=steps, minutes=0.0, grid_every=0, checkpoint_every=10 ** 9,
                               log_every=1))
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        return _steady_sec_per_step(Path(tmp) / "run")


def jobs_throughput(config: str, overrides: list[str], out, train_script, *, jobs: int = 2, steps: int = 300,
                    log=print) -> dict:
    """Training steps an hour on this machine's CPU cores three ways, measured one after another in one run:
    one process on every core (what ``launch/train.py`` does), ``jobs`` independent runs at once each pinned to its
    share of the cores (``reproduce.py --jobs``), and one run on ``jobs`` processes (gloo data parallel, the global
    batch split between them; ``torchrun``). Each trains ``steps`` steps of ``config`` from scratch; a step time is
    the median of the second half of its logged ones. Throughput ratios are to the one process."""
    import shutil
    import subprocess
    import sys

    from .runner import core_groups, run_workers

    out, groups = Path(out), core_groups(jobs)
    shutil.rmtree(out, ignore_errors=True)
    base = ["--config", config, "--runs", str(out), *overrides, f"train.steps={steps}", "train.grid_every=0",
            "train.log_every=10"]
    log(f"jobs: one process on {sum(map(len, groups))} core(s)")
    subprocess.run([sys.executable, str(train_script), *base, "--name", "one"], check=True, stdout=subprocess.DEVNULL)
    log(f"jobs: {jobs} runs at once, one per core group")
    codes = run_workers([sys.executable, str(train_script), *base, "--name", "worker{worker}"], jobs,
                        [out / f"worker{i}.log" for i in range(jobs)], log)
    if any(codes):
        raise RuntimeError(f"a worker failed (exit statuses {codes}); see {out}/worker*.log")
    log(f"jobs: one run on {jobs} processes (gloo)")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={jobs}",
                    str(train_script), *base, "--name", "ddp"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    one = _steady_sec_per_step(out / "one")
    workers = [_steady_sec_per_step(out / f"worker{i}") for i in range(jobs)]
    ddp = _steady_sec_per_step(out / "ddp")
    return {"config": config, "overrides": overrides, "steps": steps, "jobs": jobs,
            "cores": [len(g) for g in groups],
            "sec_per_step": {"one process": one, "runs at once": workers, "one run, data parallel": ddp},
            "throughput_vs_one": {"runs at once": sum(one / w for w in workers), "one run, data parallel": one / ddp}}


def jobs_table(result: dict) -> str:
    t, r = result["sec_per_step"], result["throughput_vs_one"]
    return "\n".join([
        f"| how ({result['config']}, {result['steps']} steps each) | seconds a step | steps an hour vs one process |",
        "|---|---:|---:|",
        f"| one process on {sum(result['cores'])} cores | {t['one process']:.3f} | 1.00x |",
        f"| {result['jobs']} runs at once, {'/'.join(map(str, result['cores']))} core(s) each | "
        f"{' / '.join(f'{w:.3f}' for w in t['runs at once'])} | {r['runs at once']:.2f}x |",
        f"| one run on {result['jobs']} processes (gloo) | {t['one run, data parallel']:.3f} | {r['one run, data parallel']:.2f}x |"])
