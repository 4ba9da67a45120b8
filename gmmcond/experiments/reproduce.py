"""The paper's experiments at small scale: each returns numbers (for JSON) and writes a PNG."""
from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..math.gmm import expansion_means, normal_pdf
from ..math.ngmg import density_learning
from ..io import ResultLog, median_sec_per_step, read_metrics
from ..visualize import pyplot, save_figure, save_png
from .runner import (Options, arm_config, arm_records, experiment, result_key, run_arms, select_arms, summarise,
                     summarise_arms)


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


@experiment("density", takes=("steps",), defaults={"steps": 10})
def density(opts: Options, bins: int = 50) -> dict:
    """Paper Fig. 11: Algorithm 1 moves a uniform pi_hat to a bimodal target; W1 per step for three settings."""
    out, steps = opts.path("density", "png"), opts.steps
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
    save_figure(fig, out)
    plt.close(fig)
    return result


def small_classifier(k: int) -> nn.Module:
    """A small CNN for 16x16 images: the classifier of the NGMG-vs-BCE comparison."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.GELU(), nn.Linear(64, k),
    )


def shape_accuracy(per_attribute: dict) -> float:
    """Mean per-attribute accuracy over circle, square and triangle (an eval.json's ``per_attribute``)."""
    from ..data.shapes import SHAPES

    return statistics.fmean(per_attribute[s] for s in SHAPES)


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


@experiment("ngmg-vs-bce", takes=("seeds", "steps"), defaults={"seeds": 5, "steps": 300})
def ngmg_vs_bce(opts: Options, *, lrs=(3e-4, 1e-3, 3e-3, 1e-2), eval_every: int = 10, size: int = 16,
                rare_attr: str = "outline", rare_fraction: float = 0.05) -> dict:
    """Paper Fig. 12: the same small CNN trained with BCE and both readings of NGMG entropy, over seeds and
    learning rates, on the shapes attributes as they are ("balanced") and with ``rare_attr`` present in
    ``rare_fraction`` of the training images ("rare"). Resumable: finished runs are read from OUT/ngmg-vs-bce.jsonl."""
    seeds, steps, progress = opts.seeds, opts.steps, opts.progress
    from ..data.shapes import ShapesDataset
    from ..data.protocol import stack_items

    train_set, test_set = ShapesDataset(size=size, length=4096), ShapesDataset(size=size, length=512, split="test")
    xs, ys = stack_items(train_set, range(len(train_set)))
    xt, yt = stack_items(test_set, range(len(test_set)))
    rare_col = list(train_set.attr_names).index(rare_attr)
    log = ResultLog(opts.path("ngmg-vs-bce", "jsonl"))
    for setting in ("balanced", "rare"):
        sub = _rare_subset(ys, rare_col, rare_fraction, 0) if setting == "rare" else torch.arange(len(ys))
        for lr in lrs:
            for loss in NGMG_LOSSES:
                for seed in range(seeds):
                    def compute(loss=loss, lr=lr, seed=seed, setting=setting, sub=sub) -> dict:
                        r = train_classifier(loss, xs[sub], ys[sub], xt, yt, lr=lr, seed=seed, steps=steps,
                                             eval_every=eval_every)
                        progress(f"  {setting} lr={lr:g} {loss} seed {seed}: test SSE {r['final_sse']:.3f}, "
                                 f"{rare_attr} W1 {r['per_attribute_w1'][rare_col]:.3f}")
                        return {"steps": steps, **r}

                    log.once({"setting": setting, "lr": lr, "loss": loss, "seed": seed}, compute)
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
    _plot_ngmg_vs_bce(opts.path("ngmg-vs-bce", "png"), log.records, lrs, seeds, eval_every)
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
    save_figure(fig, out)
    plt.close(fig)


# The scales an experiment runs at: a prefix of every arm's overrides (before the arm's own, which win), and so
# part of the key its result is stored under; each table's command names its scale and reproduces it.
SCALES = {
    # the shapes recipe as the paper experiments first ran on it: 2000 steps, no self-attention, not compiled,
    # Karras weighting (the tables measured before the recipe grew; RESULTS.md, "The default recipe")
    "v1": ("train.steps=2000", "model.self_attn_depths=[false,false,false]", "train.compile=false",
           "denoiser.loss=karras"),
    # the default recipe as it is now (attention, compile, soft-min-SNR); an experiment's --steps sets the length
    "recipe": (),
    # the default recipe trained and sampled the paper's way (registry/shapes_paper.yaml): L_simple on the discrete
    # VP schedule of its CelebA model, x0-reprojection at renoise 1
    "paper": ("schedule=vp_constant", "schedule.T=100", "denoiser.loss=eps", "sample.sampler.renoise=1.0"),
}
EXPERIMENT_SCALE = SCALES["v1"]


def scale_overrides(scale: str) -> tuple[str, ...]:
    from ..errors import ConfigError

    if scale not in SCALES:
        raise ConfigError(f"unknown experiment scale {scale!r}; the scales are: {', '.join(SCALES)}")
    return SCALES[scale]


def train_once(recipe: str, overrides: list[str], run: Path) -> dict:
    """Train ``recipe`` with ``overrides`` (an arm's full list, scale first) into ``run``, resuming a partial run
    and skipping a finished one; return the resolved config."""
    from ..config import load_config
    from ..engine.trainer import train

    cfg = load_config(recipe, overrides)
    if not (run / "ema.safetensors").exists():
        train(cfg, run, resume=(run / "checkpoints" / "latest").exists())
    return cfg


def trained_precision(run: Path) -> str | None:
    """The precision a run trained at, as its config.yaml records it resolved (``auto`` becomes bf16 only on a CPU
    or GPU that computes bf16 natively, so seeds trained on other hosts may differ); None without the file."""
    from ..config import yaml_load

    path = run / "config.yaml"
    return yaml_load(path.read_text(), str(path))["train"]["precision"] if path.is_file() else None


def head_share(rows: list[dict]) -> float | None:
    """The head's part of the training objective, (loss - diffusion) / loss = weight * head / loss, averaged over
    a run's logged intervals; None for a run without a head."""
    shares = [(r["loss"] - r["diffusion"]) / r["loss"] for r in rows if "head" in r and r["loss"] > 0]
    return statistics.fmean(shares) if shares else None


def from_run_folder(run: Path) -> dict:
    """What a run folder tells a result record: the precision it trained at, its median step time and, with a
    head, the head's share of the objective (each left out where the folder cannot say)."""
    out = {} if (precision := trained_precision(run)) is None else {"train_precision": precision}
    metrics = run / "metrics.jsonl"
    rows = [r for r in read_metrics(metrics) if "diffusion" in r] if metrics.is_file() else []
    if any("sec_per_step" in r for r in rows):
        out["sec_per_step_median"] = median_sec_per_step(rows)
    if (share := head_share(rows)) is not None:
        out["head_share"] = share
    return out


def fill_from_run_folders(log: ResultLog) -> None:
    """Records logged before they carried :func:`from_run_folder`'s keys take them from their run folders, where
    those still are (in memory: the log on disk is not rewritten)."""
    for r in log.records:
        if {"train_precision", "sec_per_step_median", "head_share"} - r.keys():
            for key, value in from_run_folder(Path(r["run"])).items():
                r.setdefault(key, value)


def train_and_evaluate(recipe: str, overrides: list[str], run: Path, *, n: int) -> dict:
    """:func:`train_once`, then evaluate the run; return the diffusion-loss curve and :func:`eval_summary`."""
    from ..eval.evaluate import EvalSize, eval_summary, evaluate_run

    cfg = train_once(recipe, overrides, run)
    records = [r for r in read_metrics(run / "metrics.jsonl") if "diffusion" in r]
    steps = records[-1]["step"]
    # the recipe's sampler as it is now (not the one saved with the run), so every arm is sampled alike
    ev = evaluate_run(run, {"sampler": cfg["sample"]["sampler"], "cfg_scale": cfg["sample"]["cfg_scale"]}, EvalSize(n=n),
                      progress=False)
    return {"steps": steps, "curve_steps": [r["step"] for r in records], "curve": [r["diffusion"] for r in records],
            "last100": statistics.fmean(r["diffusion"] for r in records if r["step"] > steps - 100),
            **from_run_folder(run),
            # per attribute too, so a logged result is whole without its run folder (a later machine lacks runs/)
            "per_attribute": ev["per_attribute"], **eval_summary(ev)}


def train_eval_protocol(n: int) -> str:
    """How :func:`train_and_evaluate` scores a run, as :func:`gmmcond.experiments.runner.result_key` keys it."""
    return f"train_and_evaluate n={n}"


def train_and_evaluate_arms(arms: dict, log: ResultLog, opts: Options, prefix: str) -> None:
    """:func:`run_arms` with every arm trained and evaluated alike (:func:`train_and_evaluate`), so an identical arm
    in another experiment's log (``opts.reuse``) is taken over instead of trained again."""
    run_arms(arms, log, opts, prefix, protocol=train_eval_protocol(opts.n),
             evaluate=lambda arm, seed, recipe, full, run, n: train_and_evaluate(recipe, full, run, n=n))


def plot_loss_bands(out: Path, log: "ResultLog", arms, seeds: int, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for arm in arms:
        rs = arm_records(log, arms, arm, seeds)
        drawn = [r for r in rs if "curve" in r]  # a record rebuilt from a table's per-seed summary has no curve
        if drawn:
            seeds_drawn = (f"{len(drawn)} seed{'s' * (len(drawn) != 1)}" if len(drawn) == len(rs)
                           else f"curves of {len(drawn)} of {len(rs)} seeds")
            plot_band(ax, drawn[0]["curve_steps"], [r["curve"] for r in drawn], f"{arm} ({seeds_drawn})")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)


HEAD_ARMS = {"no head": ("shapes", ["head=none"]),
             "head ngmg surplus": ("shapes", ["head=bottleneck_attrs", "head.loss=ngmg_entropy", "head.form=surplus"]),
             "head bce": ("shapes", ["head=bottleneck_attrs", "head.loss=bce"])}


def scaled_arms(arm_table: dict, opts: Options) -> dict:
    """``arm_table``'s arms (recipe, extra overrides) led by ``opts.scale``'s overrides and ``opts.steps``."""
    steps = opts.steps
    base = [*scale_overrides(opts.scale), f"train.steps={steps}", f"train.checkpoint_every={min(250, steps)}",
            "train.grid_every=0"]
    return {arm: (recipe, [*base, *extra]) for arm, (recipe, extra) in arm_table.items()}


def loss_arms(arm_table: dict, name: str, prefix: str, title: str, opts: Options, log: ResultLog | None = None) -> dict:
    """Train and evaluate the arms of ``arm_table`` (those named in ``opts.arms``, else all) at ``opts.scale`` for
    ``opts.steps`` steps and ``opts.seeds`` seeds (:func:`run_arms`, logged in ``log``, by default OUT/NAME.jsonl),
    plot their diffusion-loss bands (OUT/NAME.png), and summarise them."""
    log = ResultLog(opts.path(name, "jsonl")) if log is None else log
    chosen = select_arms(arm_table, opts.arms)
    if len(chosen) < len(arm_table):  # a subset: the legend names the arms drawn; the title must not name the rest
        title = f"{title.split(':')[0]}: {len(chosen)} of its {len(arm_table)} arms"
    arms = scaled_arms(chosen, opts)
    train_and_evaluate_arms(arms, log, opts, prefix)
    fill_from_run_folders(log)
    plot_loss_bands(opts.path(name, "png"), log, arms, opts.seeds, f"{title}, {opts.steps} steps ({opts.scale} scale)")
    return {"steps": opts.steps, "seeds": opts.seeds, "n": opts.n, "scale": opts.scale,
            "arms": summarise_arms(log, arms, opts.seeds)}


ARM_OPTIONS = ("seeds", "steps", "n", "scale", "arms", "train", "reuse")

# Issue 43: the head's weight set by its share of the objective. Each shipped-weight head arm's seed-0 run gives
# its share s at weight w; with the head and diffusion losses taken as they were, the weight for a share t is
# w * odds(t) / odds(s) (odds(p) = p / (1 - p)), rounded to two significant digits and then fixed for every seed.
HEAD_SHARES = (0.02, 0.10)
SHIPPED_HEAD_ARMS = ("head ngmg surplus", "head bce")


def share_weight(weight: float, share: float, target: float) -> float:
    """The head weight that turns a head's ``share`` of the objective at ``weight`` into ``target``."""
    odds = lambda p: p / (1 - p)  # noqa: E731
    return float(f"{weight * odds(target) / odds(share):.2g}")


def calibrated_head_arms(log: ResultLog, shipped: dict, opts: Options) -> tuple[dict, dict]:
    """Per shipped-weight head arm and :data:`HEAD_SHARES` target: "ARM, share T%" at the weight calibrated on that
    arm's seed-0 record in ``log`` or an ``opts.reuse`` log (trained first where in neither and ``opts.train``); none
    for an arm not calibrated. Returns the arms and, by the same names, their weights."""
    from ..config import load_config

    train_and_evaluate_arms(shipped, log, replace(opts, seeds=1), "head")
    arms, weights = {}, {}
    for arm, (recipe, overrides) in shipped.items():
        key = result_key(recipe, arm_config(recipe, overrides, 0)[0], train_eval_protocol(opts.n))
        rs = [*arm_records(log, shipped, arm, 1), *(r for other in opts.reuse for r in other.records
                                                     if r.get("result_key") == key)]
        if not rs or "head_share" not in rs[0]:
            continue
        weight = load_config(recipe, overrides)["head"]["weight"]
        for target in HEAD_SHARES:
            name = f"{arm}, share {target:.0%}"
            weights[name] = share_weight(weight, rs[0]["head_share"], target)
            arms[name] = (recipe, [*HEAD_ARMS[arm][1], f"head.weight={weights[name]:g}"])
    return arms, weights


def convergence(log: ResultLog, arms: dict, seeds: int, base: str = "no head") -> dict:
    """Fig. 9's "faster convergence", per arm and seed: the diffusion loss over the 100 steps up to 25% and 50% of
    training, whether the loss's 100-step running mean ever reaches the same seed's ``base`` arm's final loss (its
    last 100 steps) and the first step at which it does. Records without a curve are left out."""
    finals = {r["seed"]: r["last100"] for r in arm_records(log, arms, base, seeds)} if base in arms else {}
    out = {}
    for arm in arms:
        for r in arm_records(log, arms, arm, seeds):
            if "curve" not in r:  # a record rebuilt from a table's per-seed row keeps its numbers, not its curve
                continue
            steps, curve = np.asarray(r["curve_steps"]), np.asarray(r["curve"])
            mark = {pct: steps[-1] * pct / 100 for pct in (25, 50)}  # the last logged step is the run's length
            at = {f"loss_at_{pct}pct": float(curve[(steps > end - 100) & (steps <= end)].mean())
                  for pct, end in mark.items() if ((steps > end - 100) & (steps <= end)).any()}
            if r["seed"] in finals:
                window = max(1, int(np.searchsorted(steps, steps[0] + 100)))  # logged points per 100 steps
                running = np.convolve(curve, np.ones(window) / window, mode="valid")
                reached = np.flatnonzero(running <= finals[r["seed"]] * (1 + 1e-9))  # equal up to summation order
                at["reaches_base_final"] = float(reached.size > 0)
                if reached.size:
                    at["steps_to_base_final"] = int(steps[reached[0] + window - 1])
            out.setdefault(arm, {})[r["seed"]] = at
    return out


@experiment("head", takes=ARM_OPTIONS, defaults={"seeds": 3, "steps": 1000, "n": 512})
def head(opts: Options) -> dict:
    """Paper Fig. 9: the default recipe's model and batch with no head, a head trained with NGMG entropy
    (surplus) and a head trained with BCE, each at the shipped weight and at the weights that make the head about
    2% and 10% of the objective (calibrated on seed 0 of the shipped weight, which is trained first); diffusion-loss
    curves, the loss at 25% and 50% of the steps and the step the no-head arm's final loss is reached, and the
    evaluation of each arm's samples. Resumable per (arm, seed, config) through OUT/head.jsonl."""
    log = ResultLog(opts.path("head", "jsonl"))
    shipped = scaled_arms({a: HEAD_ARMS[a] for a in SHIPPED_HEAD_ARMS if not opts.arms or any(
        n == a or n.startswith(f"{a}, share") for n in opts.arms)}, opts)
    calibrated, weights = calibrated_head_arms(log, shipped, opts)
    table = {**HEAD_ARMS, **calibrated}
    result = loss_arms(table, "head", "head", "shapes: no head / NGMG head / BCE head", opts, log)
    # the weights fixed for every seed, there before any of their seeds is trained
    result["calibrated_weights"] = weights
    speed = convergence(log, scaled_arms(select_arms(table, opts.arms), opts), opts.seeds)
    for arm, stats in result["arms"].items():
        for r in stats["per_seed"]:
            r.update(speed.get(arm, {}).get(r["seed"], {}))
        for key in ("loss_at_25pct", "loss_at_50pct", "reaches_base_final", "steps_to_base_final"):
            values = [r[key] for r in stats["per_seed"] if key in r]
            if values and len(values) == len(stats["per_seed"]):
                stats[key] = summarise(values)
    return result


DISTRIBUTION_ARMS = {
    "fixed value (attrs)": ("shapes", ["conditioner=attrs"]),
    # the controlled ablation of Eq. 9: every latent entry the mixture's mean, same dims, scale and flag
    "gmm_attrs, constant latent (fixed value)": ("shapes", ["conditioner.pairing=constant"]),
    "gmm_attrs, fixed pairing (paper)": ("shapes", ["conditioner.pairing=fixed"]),
    "gmm_attrs, resample pairing": ("shapes", ["conditioner.pairing=resample"]),
}


@experiment("distribution", takes=ARM_OPTIONS, defaults={"seeds": 3, "steps": 1000, "n": 256})
def distribution(opts: Options) -> dict:
    """The paper's central claim (Sec. 3.2, Eqs. 8-9): attributes embedded as a distribution (the GMM latent,
    with the paper's fixed pairing of one latent per training image, and with a fresh latent each step) against
    the same attributes as a fixed value (``attrs``, and ``gmm_attrs`` with every latent entry the mixture's
    mean: only the randomness removed); same model, steps and seeds. Conformity, defects, per-set
    recall / coverage / spread, memorisation (authenticity) and the loss. Resumable per (arm, seed, config)."""
    return loss_arms(DISTRIBUTION_ARMS, "distribution", "dist",
                     "shapes: fixed value / GMM fixed pairing / GMM resample", opts)


CLASS_GRID_ROWS = "[circle_red,square_green,triangle_blue,circle_blue,square_red,triangle_green]"
COMBINATION_GRID_ROWS = "[circle+red+large,square+green+left+top,triangle+blue+dark_bg,circle+blue+large+dark_bg+outline]"
FVC_ARMS = {
    "features (11)": ("shapes", []),
    "classes shape x colour (9)": ("shapes", ["dataset.label_mode=classes", f"sample.grid_rows={CLASS_GRID_ROWS}"]),
    "classes all combinations (288)": ("shapes", ["dataset.label_mode=combinations",
                                                  f"sample.grid_rows={COMBINATION_GRID_ROWS}"]),
}


@experiment("features-vs-classes", takes=("seeds", "steps", "n", "scale", "train", "reuse"),
            defaults={"seeds": 3, "steps": 2000, "n": 512})
def features_vs_classes(opts: Options) -> dict:
    """Paper Fig. 7 on the shapes recipe at ``scale`` (``SCALES``) for ``steps`` steps: the 11 features vs one-hot
    shape x colour classes vs, as a control for information content, one-hot classes over all 288 attribute
    combinations; all through gmm_attrs, same model, steps and seeds. Accuracy on the attributes each labelling
    fixes, defects, distances beside their real references, and the seed-0 grids side by side. Resumable per (arm, seed)."""
    from PIL import Image, ImageDraw

    from ..data import shapes as S
    from ..io import read_json

    seeds, steps, n, scale, out = opts.seeds, opts.steps, opts.n, opts.scale, opts.path("features-vs-classes", "png")
    log = ResultLog(opts.path("features-vs-classes", "jsonl"))
    arms = {arm: (recipe, [*scale_overrides(scale), f"train.steps={steps}", *extra])
            for arm, (recipe, extra) in FVC_ARMS.items()}
    train_and_evaluate_arms(arms, log, opts, "fvc")
    shared = S.SHAPES + S.COLOURS  # what every arm's labels fix: compare accuracy on these alone
    for rec in [r for arm in arms for r in arm_records(log, arms, arm, seeds)]:
        per = rec.get("per_attribute") or read_json(Path(rec["run"]) / "eval.json")["per_attribute"]
        rec["shared_accuracy"] = statistics.fmean(per[a] for a in shared)
        rec["shape_accuracy"] = shape_accuracy(per)
    result = {"seeds": seeds, "n": n, "steps": steps, "scale": scale, "shared_attributes": list(shared),
              "arms": summarise_arms(log, arms, seeds)}
    grids = []
    for arm in arms:
        rec = next((r for r in arm_records(log, arms, arm, seeds) if r["seed"] == 0), None)
        files = sorted((Path(rec["run"]) / "samples").glob("grid_*.png")) if rec else []
        if files:
            grids.append((arm, rec, Image.open(files[-1]).convert("RGB")))
    if grids:
        canvas = Image.new("RGB", (sum(g.width for _, _, g in grids) + 10 * len(grids), max(g.height for *_, g in grids) + 30),
                           (255, 255, 255))
        draw, x = ImageDraw.Draw(canvas), 0
        for arm, rec, g in grids:
            canvas.paste(g, (x, 30))
            draw.text((x + 4, 2), arm, fill=(0, 0, 0))
            draw.text((x + 4, 15), f"shape+colour accuracy {rec['shared_accuracy']:.3f}, defects {rec['defect_rate']:.1%}",
                      fill=(0, 0, 0))
            x += g.width + 10
        save_png(canvas, out)
    return result


PRECISION_ARMS = {"fp32": ("shapes", ["train.precision=fp32", "train.compile=false"]),
                  "bf16 compiled": ("shapes", ["train.precision=bf16", "train.compile=true"])}


@experiment("precision", takes=("seeds", "n", "train", "reuse"), defaults={"seeds": 2, "n": 512})
def precision(opts: Options) -> dict:
    """Quality kept under the fastest setting: the shapes recipe at 2000 steps (``EXPERIMENT_SCALE``) trained
    at fp32 and at bf16 + torch.compile, ``seeds`` seeds each, every run evaluated the same way; per-seed
    values and mean +- std per arm."""
    log = ResultLog(opts.path("precision", "jsonl"))
    arms = {arm: (recipe, [*EXPERIMENT_SCALE, *extra, "train.grid_every=0"])
            for arm, (recipe, extra) in PRECISION_ARMS.items()}
    train_and_evaluate_arms(arms, log, opts, "precision")
    plot_loss_bands(opts.path("precision", "png"), log, arms, opts.seeds, "shapes: fp32 vs bf16 + torch.compile")
    return {"seeds": opts.seeds, "n": opts.n, "arms": summarise_arms(log, arms, opts.seeds)}


HELD_OUT_COMBINATIONS = ("triangle,red", "circle,green", "square,blue")
# the token conditioner and the image_v1 cross-attention it needs: a 64-wide token read at the 8x8 and 4x4 stages,
# where the recipe's self-attention sits
TOKEN_MODEL = ("conditioner.type=gmm_tokens", "model.cross_cond_dim=64", "model.cross_attn_depths=[false,true,true]")
COMBINATION_ARMS = {  # arm: (recipe, label_mode, how requests are sampled, extra overrides)
    "features joint": ("shapes", "features", "joint", []),
    "features + attr_dropout joint": ("shapes_compose", "features", "partial", []),
    "features + attr_dropout composed": ("shapes_compose", "features", "composed", []),
    "features + attr_dropout composed, weights 1": ("shapes_compose", "features", "composed", []),
    "features + attr_dropout composed, weights 3": ("shapes_compose", "features", "composed", []),
    "features + attr_dropout composed, shape 3 colour 1": ("shapes_compose", "features", "composed", []),
    # the same model asked with every attribute specified, as "features joint" is: what the dropout costs
    "features + attr_dropout, all specified": ("shapes_compose", "features", "joint", []),
    # the same model, guided away from the all-unknown condition instead of the dropped one (cfg_null)
    "features + attr_dropout, CFG from all-unknown": ("shapes_compose", "features", "partial",
                                                      ["sample.cfg_null=all_unknown"]),
    # the attr_dropout rate swept: each model asked for shape and colour only, and with every attribute specified
    **{f"features + attr_dropout {rate}{how}": ("shapes_compose", "features", mode, [f"conditioner.attr_dropout={rate}"])
       for rate in ("0.1", "0.5") for how, mode in ((" joint", "partial"), (", all specified", "joint"))},
    "one-hot shape x colour classes": ("shapes", "classes", "class", []),
    # issue: "unspecified" must mean "drawn from the data": conditions with most attributes open must occur in training
    "features + per-sample dropout, groups hidden whole": (
        "shapes_compose", "features", "partial", ["conditioner.attr_dropout_mode=per_sample", "conditioner.hide_groups=true"]),
    "features + per-sample dropout + CoInD": (
        "shapes_compose", "features", "partial", ["conditioner.attr_dropout_mode=per_sample", "conditioner.hide_groups=true",
                                                  "train.coind_weight=1.0"]),
    # CoInD as its authors train it (their trainer's defaults): each group (label column) hidden with probability 0.2
    # per sample, the penalty at weight 1 on the whole batch, one group left out per sample, on the noise prediction
    "features + CoInD as its authors train it": (
        "shapes_compose", "features", "partial", ["conditioner.attr_dropout=0.2", "conditioner.attr_dropout_mode=per_attribute",
                                                  "conditioner.hide_groups=true", "train.coind_weight=1.0",
                                                  "train.coind_fraction=1.0", "train.coind_space=noise",
                                                  "train.coind_unit=group"]),
    # open attributes drawn from the run's training rows given the shape and colour (open=data): the plain features
    # model and the attr_dropout one, each asked for the shape and colour only
    "features, open from data": ("shapes", "features", "data", []),
    "features + attr_dropout, open from data": ("shapes_compose", "features", "data", []),
    # attributes as cross-attention tokens (conditioner gmm_tokens; issue 42): alone, and beside the pooled vector;
    # asked with whole test rows, and for shape and colour with the rest drawn from the data
    **{f"tokens{pooled}{how}": ("shapes", "features", mode, [*TOKEN_MODEL, *(["conditioner.pooled=true"] if pooled else [])])
       for pooled in ("", " + pooled") for how, mode in ((" joint", "joint"), (", open from data", "data"))},
    # a further idea the results point to: the token model's failures on the default task were position (a `left` or
    # `top` shape drawn anywhere), and image_v1 reads the tokens only at the 8x8 and 4x4 stages: read them at the
    # 16x16 stage too, where the shapes are drawn
    "tokens, every stage joint": ("shapes", "features", "joint",
                                  [*TOKEN_MODEL[:2], "model.cross_attn_depths=[true,true,true]"]),
}
# the request modes' open semantics (gmmcond.sampling.requests): how each mode asks for shape and colour only
REQUEST_OPEN = {"partial": "model", "data": "data"}
# one colour negated, the two left drawn in their data proportion: the held-out colour of each shape is the one negated,
# so both colours left were seen with the shape (the training rows' proportion is the data's)
SINGLE_NEGATIONS = ("circle,~green", "square,~blue", "triangle,~red")
COMPOSED_WEIGHTS = {  # the composed arms' per-term guidance weights (shape, colour)
    "features + attr_dropout composed": (2.0, 2.0), "features + attr_dropout composed, weights 1": (1.0, 1.0),
    "features + attr_dropout composed, weights 3": (3.0, 3.0),
    "features + attr_dropout composed, shape 3 colour 1": (3.0, 1.0)}
NEGATIONS = {"~circle,~square": "triangle", "~circle,~triangle": "square", "~square,~triangle": "circle",
             "~red,~green": "blue", "~red,~blue": "green", "~green,~blue": "red"}  # request -> the member it leaves


def combination_indices(test, shape: str, colour: str, per: int) -> list[int]:
    """The first ``per`` held-out items drawing ``shape`` in ``colour``: the joint arms' requests and the real
    images their spread is measured against."""
    return [i for i in range(len(test)) if (p := test.params(i)).shape == shape and p.colour == colour][:per]


def _combination_requests(test, names, groups, shape: str, colour: str, mode: str, indices: list[int],
                          weights: tuple[float, float] | None = None, prior=None, seed: int = 0):
    """Return (attrs, known, compose) to ask a model for one image per held-out item in ``indices`` (those of
    :func:`combination_indices`) of one shape-colour combination; ``weights`` are the composed mode's guidance
    weights of the shape and the colour term; ``prior`` the run's attribute prior (mode ``data``)."""
    from ..data.attrs import parse_expr

    per = len(indices)
    rows = torch.from_numpy(np.stack([test.params(i).attrs() for i in indices]))
    if mode == "class":
        attrs = torch.zeros(per, len(names))
        attrs[:, names.index(f"{shape}_{colour}")] = 1
        return attrs, None, None
    if mode == "joint":  # every attribute specified: the other five from held-out data with this combination
        return rows, None, None
    request = parse_expr(f"{shape},{colour}", names, groups)  # as the CLI asks: both groups specified, features open
    if mode in REQUEST_OPEN:
        return (*_request_rows(request, per, mode, prior, seed), None)
    return request.values.expand(per, -1).clone(), None, [(names.index(shape), weights[0]), (names.index(colour), weights[1])]


def _request_rows(request, per: int, mode: str, prior, seed: int):
    """(attrs, known) for ``per`` samples of one request, its open attributes as the mode means them."""
    from ..sampling.requests import resolve_requests

    resolved = resolve_requests([request], per, open=REQUEST_OPEN[mode], prior=prior, partial=mode == "partial", seed=seed)
    return resolved.attrs, resolved.known


def _feature_error(read: torch.Tensor, target: dict[str, float], col) -> float:
    """Mean over the open binary features of |frequency the evaluator reads in ``read`` (probs) - target frequency|."""
    return statistics.fmean(abs((read[:, col(f)] > 0.5).float().mean().item() - target[f]) for f in target)


def combination_arms(steps: int, scale: str = "v1") -> dict[str, tuple[str, list[str]]]:
    """The combination experiment's arms at ``scale`` as (recipe, overrides): held-out combinations excluded from
    training."""
    exclude = "[" + ",".join(f'"{c}"' for c in HELD_OUT_COMBINATIONS) + "]"
    arms = {}
    for arm, (recipe, label_mode, _, own) in COMBINATION_ARMS.items():
        extra = ["sample.grid_rows=[circle_red,triangle_red]"] if label_mode == "classes" else []
        arms[arm] = (recipe, [*scale_overrides(scale), f"dataset.exclude={exclude}", f"dataset.label_mode={label_mode}",
                              f"train.steps={steps}", "train.grid_every=0", *extra, *own])
    return arms


def combination_training() -> dict[str, str]:
    """Each combination arm mapped to the first arm of ``COMBINATION_ARMS`` with the same training (recipe, label
    mode and overrides other than ``sample.*``): "composed" asks the "attr_dropout joint" model differently, so it
    reuses that run."""
    first: dict[tuple, str] = {}
    return {arm: first.setdefault((recipe, label_mode, tuple(o for o in own if not o.startswith("sample."))), arm)
            for arm, (recipe, label_mode, _, own) in COMBINATION_ARMS.items()}


def combination_scores(arm: str, seed: int, recipe: str, overrides: list[str], run: Path, per: int, *, out: Path) -> dict:
    """Train one arm (:func:`train_once`), then ask it for ``per`` images of each of the 9 shape-colour combinations:
    conformity (the requested shape and colour both right), defects (the renderer's rule) and the nuisance spread
    (the evaluator's nuisance std over the samples / over real images of the combination, averaged over the
    columns the shape defines) on seen and on held-out combinations. For the arms that leave the five features
    open (partial, composed, data): how far each feature's frequency is from its data frequency for that
    combination (``free_error``: the mean over the features of |frequency the evaluator reads in the samples -
    frequency in the test split, ``exclude`` cleared|), beside the same statistic for ``per`` real test images of
    the combination (``free_floor``, the sampling floor), and ``unspecified_tv`` (|frequency - 0.5|); for partial
    and data arms also negation (``NEGATIONS``: the member left must be drawn; ``SINGLE_NEGATIONS``: the shape
    right, the negated colour absent, the two colours left in their data proportion, beside the real floor); for
    partial arms CoInD's JSD diagnostic for (triangle, red), never seen together, and (circle, red), seen. Seed 0
    writes a grid of the held-out combinations."""
    from ..data import shapes as S
    from ..data.attrs import parse_expr
    from ..modeling.runs import load_run
    from ..eval.evaluator import evaluator_for
    from ..eval.independence import jsd_diagnostic
    from ..eval.metrics import nuisance_fidelity
    from ..registry import DATASETS
    from ..sampling.generate import generate
    from ..sampling.settings import SamplingSettings
    from ..visualize import captioned_grid

    cfg = train_once(recipe, overrides, run)
    mode = COMBINATION_ARMS[arm][2]
    test = DATASETS.build({"type": "shapes", "size": 16, "split": "test", "length": 4096})
    params = [test.params(i) for i in range(len(test))]
    held = {tuple(c.split(",")) for c in HELD_OUT_COMBINATIONS}
    loaded = load_run(run)
    prior = loaded.prior if mode == "data" else None
    model = evaluator_for(cfg["dataset"], progress=False)[0]
    names, col = loaded.parts.attr_names, list(S.ATTR_NAMES).index
    settings = SamplingSettings.of_run(cfg)
    stats, grid, tv = {"seen": [], "held_out": []}, [], {f: [] for f in S.FEATURES}
    free = {"seen": [], "held_out": []}

    def data_frequency(keep) -> dict[str, float]:  # each feature's frequency among the test items ``keep`` picks
        items = [p for p in params if keep(p)]
        return {f: statistics.fmean(float(getattr(p, f)) for p in items) for f in S.FEATURES}

    for k, (sh, co) in enumerate((sh, co) for sh in S.SHAPES for co in S.COLOURS):
        indices = combination_indices(test, sh, co, per)
        attrs, known, compose = _combination_requests(test, names, loaded.parts.groups, sh, co, mode, indices,
                                                      COMPOSED_WEIGHTS.get(arm), prior=prior, seed=1000 * seed + k)
        images = generate(loaded.parts, attrs, replace(settings, seed=1000 * seed + k), known=known, compose=compose).float()
        pred = model.predict(images)
        probs = pred["probs"]
        ok = (probs[:, col(sh)] > 0.5) & (probs[:, col(co)] > 0.5)
        # the request's variation against real images of the same combination (the joint rows' own images)
        real = model.predict(torch.stack([test[i][0] for i in indices]))
        cols = [c for c, defined in zip(S.NUISANCE_COLUMNS, S.defined_columns(sh)) if defined]
        fid = nuisance_fidelity(real["nuisances"].numpy(), pred["nuisances"].numpy(), S.NUISANCE_COLUMNS)
        defects = [S.check_image(img).defect for img in images]
        split = "held_out" if (sh, co) in held else "seen"
        stats[split].append(
            (ok.float().mean().item(), sum(defects) / len(defects), statistics.fmean(fid[c]["spread_ratio"] for c in cols)))
        if mode in ("partial", "composed", "data"):  # the five features are open: their frequency against the data's
            for f in S.FEATURES:
                tv[f].append(abs((probs[:, col(f)] > 0.5).float().mean().item() - 0.5))
            target = data_frequency(lambda p: p.shape == sh and p.colour == co)
            free[split].append((_feature_error(probs, target, col), _feature_error(real["probs"], target, col)))
        if (sh, co) in held:
            grid.append((images[:8], f"{arm}: {sh},{co} (never seen)"))
    rec = {"per": per, "steps": latest_step(run)}
    for split, vals in stats.items():
        rec[f"conformity_{split}"] = statistics.fmean(v[0] for v in vals)
        rec[f"defects_{split}"] = statistics.fmean(v[1] for v in vals)
        rec[f"spread_{split}"] = statistics.fmean(v[2] for v in vals)
        if free[split]:
            rec[f"free_error_{split}"] = statistics.fmean(v[0] for v in free[split])
            rec[f"free_floor_{split}"] = statistics.fmean(v[1] for v in free[split])
            rec[f"free_error_ratio_{split}"] = rec[f"free_error_{split}"] / max(rec[f"free_floor_{split}"], 1e-9)
    rec["conformity_ratio"] = rec["conformity_held_out"] / max(rec["conformity_seen"], 1e-9)
    if tv[S.FEATURES[0]]:
        rec["unspecified_tv"] = {f: statistics.fmean(v) for f, v in tv.items()}
        rec["unspecified_tv_max"] = max(rec["unspecified_tv"].values())
    if mode in REQUEST_OPEN:
        right = []
        for k, (text, member) in enumerate(NEGATIONS.items()):
            attrs, known = _request_rows(parse_expr(text, names, loaded.parts.groups), per, mode, prior, 1000 * seed + 100 + k)
            images = generate(loaded.parts, attrs, replace(settings, seed=1000 * seed + 100 + k), known=known).float()
            right.append((model.predict(images)["probs"][:, col(member)] > 0.5).float().mean().item())
        rec["negation_conformity"] = statistics.fmean(right)
        single = []
        for k, text in enumerate(SINGLE_NEGATIONS):
            shape, colour = text.split(",~")
            left = [c for c in S.COLOURS if c != colour]
            attrs, known = _request_rows(parse_expr(text, names, loaded.parts.groups), per, mode, prior, 1000 * seed + 200 + k)
            images = generate(loaded.parts, attrs, replace(settings, seed=1000 * seed + 200 + k), known=known).float()
            probs = model.predict(images)["probs"]
            items = [i for i, p in enumerate(params) if p.shape == shape and p.colour != colour]
            share = {c: statistics.fmean(float(params[i].colour == c) for i in items) for c in left}
            real = model.predict(torch.stack([test[i][0] for i in items[:per]]))["probs"]
            ok = (probs[:, col(shape)] > 0.5) & (probs[:, col(colour)] <= 0.5)
            single.append((ok.float().mean().item(), _feature_error(probs, share, col), _feature_error(real, share, col)))
        rec["single_negation_conformity"] = statistics.fmean(v[0] for v in single)
        rec["single_negation_error"] = statistics.fmean(v[1] for v in single)
        rec["single_negation_floor"] = statistics.fmean(v[2] for v in single)
    if mode == "partial":
        real = torch.stack([test[i][0] for i in range(128)])
        for pair in (("triangle", "red"), ("circle", "red")):
            rec[f"jsd_{'_'.join(pair)}"] = jsd_diagnostic(loaded.parts, real, names.index(pair[0]), names.index(pair[1]),
                                                          seed=seed)["jsd"]
    if seed == 0:
        save_png(captioned_grid([g[0] for g in grid], [g[1] for g in grid]),
                 out.with_name(f"combinations_{arm.replace(',', '').replace(' ', '_').replace('+', 'and')}.png"))
    return rec


def latest_step(run: Path) -> int:
    """The last step a run trained (from its metrics.jsonl): what an experiment records, not the steps asked for."""
    return read_metrics(run / "metrics.jsonl")[-1]["step"]


@experiment("combinations", takes=("seeds", "steps", "n", "scale", "arms", "train"),
            defaults={"seeds": 2, "steps": 2000, "n": 64})
def combinations(opts: Options) -> dict:
    """Attribute combinations never seen in training (red triangle, green circle, blue square): conformity and
    defects on seen vs held-out combinations per arm and seed (:func:`combination_scores`), through
    :func:`run_arms` (resumable, keyed by the full arm config); ``arms`` picks some of ``COMBINATION_ARMS``."""
    log = ResultLog(opts.path("combinations", "jsonl"))
    table = combination_arms(opts.steps, opts.scale)
    arms = select_arms(table, opts.arms)
    trained_by = {arm: (owner, table[owner]) for arm, owner in combination_training().items()}
    out = opts.path("combinations", "png")
    run_arms(arms, log, opts, "comb", trained_by=trained_by,
             evaluate=lambda *args: combination_scores(*args, out=out))
    fill_from_run_folders(log)  # the step time and precision of each seed, read where its run folder still is
    return {"held_out": list(HELD_OUT_COMBINATIONS), "seeds": opts.seeds, "steps": opts.steps, "scale": opts.scale,
            "per": opts.n, "arms": summarise_arms(log, arms, opts.seeds)}
