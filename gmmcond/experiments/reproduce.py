"""The paper's experiments at small scale: each returns numbers (for JSON) and writes a PNG."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from ..math.gmm import expansion_means, normal_pdf
from ..math.ngmg import density_learning
from ..visualize import pyplot


def mean_spread(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Return the per-step mean and standard deviation of equal-length curves."""
    cols = list(zip(*curves))
    return [statistics.fmean(c) for c in cols], [statistics.pstdev(c) for c in cols]


def plot_band(ax, x: list[int], curves: list[list[float]], label: str) -> dict:
    """Plot the mean of several seeds' curves with a +-1 std band; return the mean and std."""
    mean, std = mean_spread(curves)
    ax.plot(x, mean, label=label)
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25)
    return {"mean": mean, "std": std}


def density(out: Path, bins: int = 50, steps: int = 10) -> dict:
    """Paper Fig. 11: Algorithm 1 moves a uniform pi_hat to a bimodal target; W1 per step for three settings."""
    means = expansion_means(bins)
    target = normal_pdf(means, 0.25, 0.06) + normal_pdf(means, 0.75, 0.06)
    target = target / target.sum()
    start = torch.full((bins,), 1 / bins, dtype=torch.float64)
    width = 1 / (bins - 1)
    settings = {
        "paper kernel, sigma 1 bin, lr 0.03": dict(kernel_sigma=width, lr=0.03),
        "paper kernel, sigma 1 bin, lr 0.1": dict(kernel_sigma=width, lr=0.1),
        "kept diagonal, normalised rows, lr 1.0": dict(kernel_sigma=width, lr=1.0, keep_diagonal=True, normalise=True),
    }
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    result = {}
    for name, kw in settings.items():
        run = density_learning(start, target, means, steps=steps, w1_sigma=width, eps=0.0, **kw)
        result[name] = {"w1": run.w1, "w1_ratio_at_end": run.w1[-1] / run.w1[0], "monotone": run.monotone}
        axes[1].plot(run.w1, marker="o", label=name)
        if name.startswith("paper kernel, sigma 1 bin, lr 0.03"):
            for k in (0, 2, 5, steps):
                axes[0].plot(means, run.pi_hats[k], label=f"step {k}", alpha=0.8)
    axes[0].plot(means, target, "k--", label="target")
    axes[0].set_title("Algorithm 1 (paper kernel, lr 0.03)")
    axes[0].legend()
    axes[1].set_title("W1 to the target")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return result


def small_classifier(k: int) -> nn.Module:
    """A small CNN for 16x16 images: the classifier of the NGMG-vs-BCE comparison."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.GELU(), nn.Linear(64, k),
    )


def ngmg_vs_bce(out: Path, seeds: int = 3, steps: int = 300, eval_every: int = 10, size: int = 16) -> dict:
    """Paper Fig. 12: the same classifier trained with NGMG entropy and with BCE; test SSE per step."""
    from ..data.shapes import ShapesDataset
    from ..eval.evaluate import stack_items
    from ..math.ngmg import bce, ngmg_entropy

    train_set, test_set = ShapesDataset(size=size, length=4096), ShapesDataset(size=size, length=512, split="test")
    xs, ys = stack_items(train_set, len(train_set))
    xt, yt = stack_items(test_set, len(test_set))
    curves: dict[str, list[list[float]]] = {"ngmg_entropy": [], "bce": []}
    for name, loss_fn in (("ngmg_entropy", ngmg_entropy), ("bce", bce)):
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = small_classifier(ys.shape[1])
            opt = torch.optim.Adam(model.parameters(), 1e-3)
            gen = torch.Generator().manual_seed(seed)
            curve = []
            for step in range(steps + 1):
                if step % eval_every == 0:
                    with torch.no_grad():
                        curve.append(((torch.sigmoid(model(xt)) - yt) ** 2).sum(1).mean().item())
                if step == steps:
                    break
                idx = torch.randint(0, len(xs), (64,), generator=gen)
                opt.zero_grad()
                loss_fn(model(xs[idx]), ys[idx]).mean().backward()
                opt.step()
            curves[name].append(curve)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    x = list(range(0, steps + 1, eval_every))
    result = {"steps": x, "seeds": seeds}
    for name, cs in curves.items():
        band = plot_band(ax, x, cs, name)
        result[name] = {**band, "final_mean": band["mean"][-1], "final_std": band["std"][-1]}
    ax.set_xlabel("step")
    ax.set_ylabel("test sum of squared error")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"NGMG entropy vs BCE, shapes attributes ({seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return result


SMALL_MODEL = ("model.channels=[16,32,64]", "model.mapping_out=64", "train.batch_size=32", "train.grid_every=0")


def head(out: Path, runs: Path, seeds: int = 3, steps: int = 300, overrides: tuple[str, ...] = ()) -> dict:
    """Paper Fig. 9: diffusion loss of the shapes model with and without the NGMG head, same seeds and steps."""
    from ..config import load_config
    from ..engine.trainer import train
    from ..io import read_metrics

    base = [*SMALL_MODEL, f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10", *overrides]
    curves: dict[str, list[list[float]]] = {"no head": [], "ngmg head": []}
    for label, extra in (("no head", ["head=none"]), ("ngmg head", ["head=bottleneck_attrs"])):
        for seed in range(seeds):
            cfg = load_config("shapes", [*base, *extra, f"train.seed={seed}"])
            run = runs / f"head_{label.replace(' ', '_')}_seed{seed}"
            if (run / "checkpoints" / "latest").exists():
                train(cfg, run, resume=True)
            else:
                train(cfg, run)
            records = read_metrics(run / "metrics.jsonl")
            x = [r["step"] for r in records]
            curves[label].append([r["diffusion"] for r in records])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    result = {"steps": x, "seeds": seeds}
    tail_points = sum(1 for s in x if s > x[-1] - 100)  # logged points in the last 100 steps
    for label, cs in curves.items():
        tail = [statistics.fmean(c[-tail_points:]) for c in cs]  # mean diffusion loss over the last 100 steps, per seed
        result[label] = {**plot_band(ax, x, cs, label), "last100_per_seed": tail, "last100_mean": statistics.fmean(tail)}
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"shapes diffusion loss with / without the NGMG head ({seeds} seeds)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return result



def features_vs_classes(out: Path, runs: Path, seeds: int = 2, steps: int = 600, n: int = 256) -> dict:
    """Paper Fig. 7 at small scale: one model conditioned on the shapes features, one on the one-hot
    shape x colour class, both through gmm_attrs; same model, steps and seeds. Defects, Frechet distance
    (oracle features) and final training loss side by side, and a grid of each."""
    from PIL import Image, ImageDraw

    from ..config import load_config
    from ..engine.trainer import train
    from ..eval.evaluate import evaluate_run
    from ..io import read_metrics

    class_rows = "[circle_red,square_green,triangle_blue,circle_blue,square_red,triangle_green]"
    result: dict = {"steps": steps, "seeds": seeds, "n": n}
    grids = {}
    for mode in ("features", "classes"):
        rows = []
        for seed in range(seeds):
            extra = [f"dataset.label_mode={mode}", f"train.seed={seed}", f"conditioner.seed={seed}", f"train.steps={steps}",
                     f"train.checkpoint_every={steps}"]
            if mode == "classes":
                extra.append(f"sample.grid_rows={class_rows}")
            cfg = load_config("shapes", [*SMALL_MODEL, *extra])
            run = runs / f"fvc_{mode}_seed{seed}"
            if not (run / "ema.safetensors").exists():
                train(cfg, run, resume=(run / "checkpoints" / "latest").exists())
            metrics = read_metrics(run / "metrics.jsonl")
            ev = evaluate_run(run, n=n, oracle_cache=runs / "oracle_shapes.safetensors", progress=False)
            rows.append({"seed": seed, "defect_rate": ev["defect_rate"], "defect_rate_size_free": ev["defect_rate_size_free"],
                         "frechet_distance": ev["frechet_distance"],
                         "attribute_accuracy": ev["attribute_accuracy"],
                         "final_loss": statistics.fmean(m["diffusion"] for m in metrics if m["step"] > steps - 100)})
            if seed == 0:
                grids[mode] = Image.open(run / "samples" / f"grid_{steps:07d}.png").convert("RGB")
        result[mode] = {"per_seed": rows, **{k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "seed"}}
    w = sum(g.width for g in grids.values()) + 10
    h = max(g.height for g in grids.values()) + 20
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    draw = ImageDraw.Draw(canvas)
    for mode, g in grids.items():
        canvas.paste(g, (x, 20))
        r = result[mode]
        draw.text((x + 4, 4), f"{mode}: defects {r['defect_rate_size_free']:.1%} (size-free rule), FD {r['frechet_distance']:.0f}, "
                              f"loss {r['final_loss']:.4f}", fill=(0, 0, 0))
        x += g.width + 10
    canvas.save(out)
    return result
