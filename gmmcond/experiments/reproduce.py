"""The paper's experiments at small scale: each returns numbers (for JSON) and writes a PNG."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch import nn

from ..math.gmm import expansion_means, normal_pdf
from ..math.ngmg import density_learning
from ..io import append_metrics, read_metrics
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


class ResultLog:
    """Append-only JSONL of finished (arm, seed, ...) results, so an interrupted experiment resumes: a re-run
    skips every key already in the file, and each result lands on disk the moment it is done."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records = read_metrics(self.path)  # one JSON object per line, like metrics.jsonl

    @staticmethod
    def key(record: dict, fields) -> tuple:
        return tuple(record[f] for f in fields)

    def done(self, fields, **key) -> dict | None:
        """Return the finished record with these key values, or None."""
        want = tuple(key[f] for f in fields)
        return next((r for r in self.records if self.key(r, fields) == want), None)

    def add(self, record: dict) -> dict:
        append_metrics(self.path, [record])
        self.records.append(record)
        return record


def summarise(values: list[float]) -> dict:
    """Mean, standard deviation (n - 1) and n of per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


NGMG_LOSSES = ("bce", "ngmg_surplus", "ngmg_deficit")


def _classifier_loss(name: str):
    from ..math.ngmg import bce, ngmg_entropy

    if name == "bce":
        return bce
    return lambda logits, y: ngmg_entropy(logits, y, form=name.split("_")[1])


def _rare_subset(ys: torch.Tensor, column: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a training subset in which attribute ``column`` is present in ``fraction`` of the images."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = (ys[:, column] > 0.5).nonzero().flatten(), (ys[:, column] <= 0.5).nonzero().flatten()
    keep = round(fraction / (1 - fraction) * len(neg))
    return torch.cat([neg, pos[torch.randperm(len(pos), generator=gen)[:keep]]])


def train_classifier(loss_name: str, xs, ys, xt, yt, *, lr: float, seed: int, steps: int, eval_every: int,
                     batch: int = 64) -> dict:
    """Train the small CNN with one loss; return test SSE and mean |q - y| curves (per attribute at the end)."""
    loss_fn = _classifier_loss(loss_name)
    torch.manual_seed(seed)
    model = small_classifier(ys.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    sse, w1 = [], []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                q = torch.sigmoid(model(xt))
            sse.append(((q - yt) ** 2).sum(1).mean().item())
            w1.append((q - yt).abs().mean().item())
        if step == steps:
            break
        idx = torch.randint(0, len(xs), (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(xs[idx]), ys[idx]).mean().backward()
        opt.step()
    per_attr_w1 = (q - yt).abs().mean(0).tolist()
    acc = ((q > 0.5).float() == yt).float().mean(0).tolist()
    return {"sse": sse, "w1": w1, "final_sse": sse[-1], "final_log_w1": math.log(w1[-1]),
            "per_attribute_w1": per_attr_w1, "per_attribute_accuracy": acc}


def ngmg_vs_bce(out: Path, log_path: Path, *, seeds: int = 5, lrs=(3e-4, 1e-3, 3e-3, 1e-2), steps: int = 300,
                eval_every: int = 10, size: int = 16, rare_attr: str = "outline", rare_fraction: float = 0.05,
                progress=print) -> dict:
    """Paper Fig. 12: the same small CNN trained with BCE and both readings of NGMG entropy, over seeds and
    learning rates, on the shapes attributes as they are ("balanced") and with ``rare_attr`` present in
    ``rare_fraction`` of the training images ("rare"). Resumable: finished runs are read from ``log_path``."""
    from ..data.shapes import ShapesDataset
    from ..eval.evaluate import stack_items

    train_set, test_set = ShapesDataset(size=size, length=4096), ShapesDataset(size=size, length=512, split="test")
    xs, ys = stack_items(train_set, len(train_set))
    xt, yt = stack_items(test_set, len(test_set))
    rare_col = list(train_set.attr_names).index(rare_attr)
    log = ResultLog(log_path)
    fields = ("setting", "lr", "loss", "seed")
    for setting in ("balanced", "rare"):
        sub = _rare_subset(ys, rare_col, rare_fraction, 0) if setting == "rare" else torch.arange(len(ys))
        for lr in lrs:
            for loss in NGMG_LOSSES:
                for seed in range(seeds):
                    if log.done(fields, setting=setting, lr=lr, loss=loss, seed=seed):
                        continue
                    r = train_classifier(loss, xs[sub], ys[sub], xt, yt, lr=lr, seed=seed, steps=steps, eval_every=eval_every)
                    log.add({"setting": setting, "lr": lr, "loss": loss, "seed": seed, "steps": steps, **r})
                    progress(f"  {setting} lr={lr:g} {loss} seed {seed}: test SSE {r['final_sse']:.3f}, "
                             f"{rare_attr} W1 {r['per_attribute_w1'][rare_col]:.3f}")
    table: dict = {"steps": steps, "seeds": seeds, "lrs": list(lrs), "rare_attr": rare_attr,
                   "rare_fraction": rare_fraction, "settings": {}}
    for setting in ("balanced", "rare"):
        table["settings"][setting] = {}
        for lr in lrs:
            row = {}
            for loss in NGMG_LOSSES:
                rs = [r for r in log.records if (r["setting"], r["lr"], r["loss"]) == (setting, lr, loss) and r["seed"] < seeds]
                row[loss] = {"final_sse": summarise([r["final_sse"] for r in rs]),
                             "final_log_w1": summarise([r["final_log_w1"] for r in rs]),
                             "rare_attr_w1": summarise([r["per_attribute_w1"][rare_col] for r in rs]),
                             "rare_attr_accuracy": summarise([r["per_attribute_accuracy"][rare_col] for r in rs]),
                             "per_seed_final_sse": [r["final_sse"] for r in rs]}
            table["settings"][setting][str(lr)] = row
    _plot_ngmg_vs_bce(out, log.records, lrs, seeds, eval_every)
    return table


def _plot_ngmg_vs_bce(out: Path, records: list[dict], lrs, seeds: int, eval_every: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(lrs), figsize=(3.2 * len(lrs), 6), dpi=100, sharey=True)
    for row, setting in enumerate(("balanced", "rare")):
        for col, lr in enumerate(lrs):
            ax = axes[row][col]
            for loss in NGMG_LOSSES:
                cs = [r["sse"] for r in records if (r["setting"], r["lr"], r["loss"]) == (setting, lr, loss) and r["seed"] < seeds]
                if cs:
                    plot_band(ax, [i * eval_every for i in range(len(cs[0]))], cs, loss)
            ax.set_title(f"{setting}, lr {lr:g}", fontsize=9)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel("test SSE")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"NGMG entropy (surplus, deficit) vs BCE on shapes attributes, mean +- std over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


SMALL_MODEL = ("model.channels=[16,32,64]", "model.mapping_out=64", "train.batch_size=32", "train.grid_every=0")


HEAD_ARMS = {"no head": ["head=none"],
             "head ngmg surplus": ["head=bottleneck_attrs", "head.loss=ngmg_entropy", "head.form=surplus"],
             "head bce": ["head=bottleneck_attrs", "head.loss=bce"]}


def head(out: Path, runs: Path, log_path: Path, *, seeds: int = 3, steps: int = 1000, n: int = 256,
         overrides: tuple[str, ...] = (), progress=print) -> dict:
    """Paper Fig. 9: the default recipe's model and batch with no head, a head trained with NGMG entropy
    (surplus) and a head trained with BCE; diffusion-loss curves and the evaluation of each arm's samples.
    Resumable per (arm, seed) through ``log_path``."""
    from ..config import load_config
    from ..engine.trainer import train
    from ..eval.evaluate import evaluate_run

    log = ResultLog(log_path)
    kept = ("attribute_accuracy", "all_attributes_correct", "defect_rate", "frechet_distance")
    base = [f"train.steps={steps}", f"train.checkpoint_every={min(250, steps)}", "train.grid_every=0", *overrides]
    for arm, extra in HEAD_ARMS.items():
        for seed in range(seeds):
            if log.done(("arm", "seed"), arm=arm, seed=seed):
                continue
            cfg = load_config("shapes", [*base, *extra, f"train.seed={seed}", f"conditioner.seed={seed}"])
            run = runs / f"head_{arm.replace(' ', '_')}_seed{seed}"
            if not (run / "ema.safetensors").exists():
                train(cfg, run, resume=(run / "checkpoints" / "latest").exists())
            records = read_metrics(run / "metrics.jsonl")
            ev = evaluate_run(run, n=n, oracle_cache=runs / "oracle_shapes.safetensors", progress=False)
            rec = log.add({"arm": arm, "seed": seed, "steps": steps, **{k: ev[k] for k in kept},
                           "curve_steps": [r["step"] for r in records], "curve": [r["diffusion"] for r in records],
                           "last100": statistics.fmean(r["diffusion"] for r in records if r["step"] > steps - 100)})
            progress(f"  {arm} seed {seed}: last-100 loss {rec['last100']:.4f}, accuracy {rec['attribute_accuracy']:.4f}, "
                     f"defects {rec['defect_rate']:.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    result: dict = {"steps": steps, "seeds": seeds, "n": n, "arms": {}}
    for arm in HEAD_ARMS:
        rs = [r for r in log.records if r["arm"] == arm and r["seed"] < seeds]
        if not rs:
            continue
        plot_band(ax, rs[0]["curve_steps"], [r["curve"] for r in rs], f"{arm} ({len(rs)} seeds)")
        result["arms"][arm] = {k: summarise([r[k] for r in rs]) for k in ("last100", *kept)}
        result["arms"][arm]["per_seed"] = [{k: r[k] for k in ("seed", "last100", *kept)} for r in rs]
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"shapes: no head / NGMG head / BCE head, {steps} steps")
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


PRECISION_ARMS = {"fp32": ["train.precision=fp32", "train.compile=false"],
                  "bf16_compiled": ["train.precision=bf16", "train.compile=true"]}


def precision(out: Path, runs: Path, log_path: Path, *, seeds: int = 2, n: int = 512, progress=print) -> dict:
    """Quality kept under the fastest setting: the default recipe trained at fp32 and at bf16 + torch.compile,
    ``seeds`` seeds each, every run evaluated the same way; per-seed values and mean +- std per arm."""
    from ..config import load_config
    from ..engine.trainer import train
    from ..eval.evaluate import evaluate_run

    log = ResultLog(log_path)
    metrics_kept = ("attribute_accuracy", "all_attributes_correct", "defect_rate", "frechet_distance")
    for arm, overrides in PRECISION_ARMS.items():
        for seed in range(seeds):
            if log.done(("arm", "seed"), arm=arm, seed=seed):
                continue
            cfg = load_config("shapes", [*overrides, f"train.seed={seed}", f"conditioner.seed={seed}", "train.grid_every=0"])
            run = runs / f"precision_{arm}_seed{seed}"
            if not (run / "ema.safetensors").exists():
                train(cfg, run, resume=(run / "checkpoints" / "latest").exists())
            records = read_metrics(run / "metrics.jsonl")
            ev = evaluate_run(run, n=n, oracle_cache=runs / "oracle_shapes.safetensors", progress=False)
            rec = {"arm": arm, "seed": seed, **{k: ev[k] for k in metrics_kept},
                   "final_loss": statistics.fmean(r["diffusion"] for r in records if r["step"] > records[-1]["step"] - 100),
                   "sec_per_step_median": statistics.median(r["sec_per_step"] for r in records[1:])}
            log.add(rec)
            progress(f"  {arm} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if isinstance(v, float)))
    result = {"seeds": seeds, "n": n, "arms": {}}
    for arm in PRECISION_ARMS:
        rs = [r for r in log.records if r["arm"] == arm and r["seed"] < seeds]
        result["arms"][arm] = {"overrides": PRECISION_ARMS[arm], "per_seed": rs,
                               **{k: summarise([r[k] for r in rs]) for k in (*metrics_kept, "final_loss", "sec_per_step_median")}}
    return result
