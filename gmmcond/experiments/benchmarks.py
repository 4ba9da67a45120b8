"""Benchmarks: samplers on the exact Gaussian-mixture testbed, and sampler wall time on the shapes model."""
from __future__ import annotations

import time

import k_diffusion as K
import torch

from ..sampling.samplers import sample
from ..sampling.testbed import GaussianMixtureDenoiser, sliced_wasserstein

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


def sampler_step_time(parts, batch: int = 16, steps: int = 20, repeats: int = 3) -> dict:
    """Wall time per step of x0_reproject and k-diffusion's euler on the same model, interleaved; and their ratio."""
    size = parts.dataset.size
    attrs = torch.zeros(batch, len(parts.attr_names))
    cond = parts.conditioner.encode(attrs, parts.conditioner.sample_latents(batch)) if parts.conditioner.dim else None
    extra = {} if cond is None else {"mapping_cond": cond}
    sigmas = parts.schedule.sigmas(steps)
    noise = torch.randn(batch, 3, size, size)
    times = {"x0_reproject": [], "euler": []}
    with torch.no_grad():
        sample("euler", parts.denoiser, noise, sigmas, extra_args=extra)  # warm-up
        for _ in range(repeats):
            for name in times:
                t0 = time.perf_counter()
                sample(name, parts.denoiser, noise, sigmas, extra_args=extra)
                times[name].append((time.perf_counter() - t0) / steps)
    best = {k: min(v) for k, v in times.items()}
    return {"sec_per_step": best, "ratio_x0_reproject_to_euler": best["x0_reproject"] / best["euler"], "batch": batch}


def plot_samplers(result: dict, out) -> None:
    """Plot sliced W1 against model evaluations for every sampler, with the noise floor."""
    from ..visualize import pyplot

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
    fig.savefig(out)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """Render the sampler table as Markdown (sliced W1; the floor in the caption)."""
    nfes = sorted(next(iter(result["table"].values())), key=int)
    lines = ["| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
    for label, row in result["table"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[n]['sw1']:.4f}" for n in nfes) + " |")
    lines.append(f"\nexact-vs-exact noise floor: {result['floor']:.4f}")
    return "\n".join(lines)


def _train_variant(cfg: dict, variant: str):
    """Build one training-benchmark variant; return (step function, modules) on shared data.

    a: plain k-diffusion image_v1 + Denoiser, fed a zero mapping_cond of the conditioner's size;
    b: + gmm_attrs (fixed pairing, dropout); c: + the bottleneck_attrs head with NGMG entropy.
    """
    from ..config import resolve
    from ..engine.trainer import DiffusionTrainer
    from ..modeling.build import build

    node = dict(cfg)
    node["head"] = {"type": "bottleneck_attrs"} if variant == "c" else "none"
    torch.manual_seed(0)
    parts = build(resolve(node))
    module = DiffusionTrainer(parts).train()
    opt = torch.optim.AdamW(module.parameters(), 1e-4)
    dim = parts.conditioner.dim

    def step(images, attrs, index, noise, sigma):
        if variant == "a":
            loss = parts.denoiser.loss(images, noise, sigma, mapping_cond=images.new_zeros(len(images), dim)).mean()
        else:
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


def _peak_rss_child(cfg: dict, variant: str, steps: int, queue) -> None:
    from ..utils import peak_rss_mb

    step, parts = _train_variant(cfg, variant)
    for s in range(steps):
        step(*_batch(parts, cfg["train"]["batch_size"], s))
    queue.put(peak_rss_mb())


def train_step_time(cfg: dict, steps: int = 10, repeats: int = 9, memory: bool = True) -> dict:
    """Wall time per training step of variants a/b/c (see ``_train_variant``), interleaved; ratios to a.

    Peak memory is the peak RSS of a fresh process per variant running the same steps.
    """
    variants = {v: _train_variant(cfg, v) for v in "abc"}
    batches = [_batch(variants["a"][1], cfg["train"]["batch_size"], s) for s in range(steps)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v, (step, _) in variants.items():  # warm-up
        step(*batches[0])
    order = list(variants)
    for r in range(repeats):
        for v in order[r % 3:] + order[: r % 3]:  # rotate the order so no variant always runs first
            step = variants[v][0]
            t0 = time.perf_counter()
            for b in batches:
                step(*b)
            times[v].append((time.perf_counter() - t0) / steps)
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    result = {"sec_per_step": med, "ratio_b_to_a": med["b"] / med["a"], "ratio_c_to_a": med["c"] / med["a"],
              "batch": cfg["train"]["batch_size"], "steps": steps, "repeats": repeats}
    if memory:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        peaks = {}
        for v in variants:
            q = ctx.Queue()
            p = ctx.Process(target=_peak_rss_child, args=(cfg, v, steps, q))
            p.start()
            peaks[v] = q.get()
            p.join()
        result["peak_rss_mb"] = peaks
        result["memory_ratio_b_to_a"], result["memory_ratio_c_to_a"] = peaks["b"] / peaks["a"], peaks["c"] / peaks["a"]
    return result
