"""The peer a user would pick instead: diffusers' ``UNet2DModel`` trained the way diffusers' own text-to-image example
(``examples/text_to_image/train_text_to_image.py``) trains, for the same minutes on the same machine as a gmmcond run,
and scored by this project's protocol (:func:`gmmcond.eval.evaluate.evaluate_sampler`).

As the example trains: AdamW at ``1e-4`` (betas ``0.9, 0.999``, weight decay ``1e-2``, eps ``1e-8``) on a constant
schedule, gradients clipped at norm 1, bf16 mixed precision, the min-SNR-gamma weighting at gamma 5 (Hang et al.
2023) and an EMA of the weights (diffusers' ``EMAModel`` at its defaults); v-prediction on the cosine
(``squaredcos_cap_v2``) schedule of 1000 steps. The attribute vector (as -1 / +1, so the dropped condition, all
zeros, is no row of the data) goes through a linear layer into the U-Net's class embedding and is dropped for 10% of
the samples, for classifier-free guidance. Sampled with DPM-Solver++ (2M) at 30 steps and CFG 1.5: 60 model calls a
sample. ``diffusers`` is an optional extra (``pip install -e '.[peer]'``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import median_seconds
from ..modeling.precision import autocast


def diffusers():
    """The diffusers package, or a one-line error that says how to install it."""
    try:
        import diffusers as module
    except ImportError:
        raise ConfigError("the peer needs diffusers: pip install -e '.[peer]' (or pip install diffusers)") from None
    return module


@dataclass(frozen=True)
class PeerRecipe:
    """How the peer is built, trained and sampled (the module docstring says where each choice comes from). The
    U-Net mirrors the gmmcond recipe's widths and where its attention sits (8x8 and 4x4), at two blocks a level."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 2
    attention: tuple[bool, ...] = (False, True, True)
    # 64 dims a head: at diffusers' default of 8 (8 and 16 heads) a training step took 1.5x as long on a 2-core
    # CPU (480 against 316 ms, bf16, measured here), which would hand the peer fewer steps for nothing in return
    attention_head_dim: int = 64
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float = 5.0
    cond_dropout: float = 0.1
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    precision: str = "bf16"  # "bf16" mixed precision or "fp32" (gmmcond.modeling.precision's names)
    sample_steps: int = 30
    cfg_scale: float = 1.5

    @classmethod
    def from_overrides(cls, overrides: list[str]) -> "PeerRecipe":
        """The recipe with ``FIELD=VALUE`` overrides, read and checked as a config section is (values as YAML, each
        of its default's type; a tuple as ``[a,b]``), e.g. ``lr=1e-3``; a wrong one is a one-line ConfigError."""
        from ..config import apply_override, resolve_section

        raw: dict = {}
        for item in overrides:
            apply_override(raw, item)
        values = resolve_section("peer", raw, cls)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @property
    def model_calls(self) -> int:
        """Model evaluations a sample costs: one conditional and one unconditional a step."""
        return self.sample_steps * (2 if self.cfg_scale != 1 else 1)


class PeerUNet(nn.Module):
    """diffusers' UNet2DModel with the attribute vector projected into its class embedding."""

    def __init__(self, recipe: PeerRecipe, n_attrs: int, size: int):
        super().__init__()
        for ch, attn in zip(recipe.block_out_channels, recipe.attention):
            if attn and ch % recipe.attention_head_dim:
                raise ConfigError(f"the peer's attention_head_dim {recipe.attention_head_dim} must divide the {ch} "
                                  f"channels of each level with attention")
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in recipe.attention)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.attention))
        self.unet = diffusers().UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, block_out_channels=recipe.block_out_channels,
            layers_per_block=recipe.layers_per_block, down_block_types=down, up_block_types=up,
            attention_head_dim=recipe.attention_head_dim, class_embed_type="identity",
            norm_num_groups=min(32, recipe.block_out_channels[0]))
        self.attr_proj = nn.Linear(n_attrs, recipe.block_out_channels[0] * 4)  # the time embedding's width

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``cond``: attributes as -1 / +1, zeros where dropped."""
        return self.unet(x, t, class_labels=self.attr_proj(cond)).sample


def as_condition(attrs: torch.Tensor) -> torch.Tensor:
    """Attributes (0 / 1) as the peer's condition (-1 / +1)."""
    return attrs * 2 - 1


def train_scheduler(recipe: PeerRecipe):
    return diffusers().DDPMScheduler(num_train_timesteps=recipe.train_timesteps, beta_schedule=recipe.beta_schedule,
                                     prediction_type=recipe.prediction_type)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """The example's min-SNR-gamma weights: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    return weights / (snr + 1) if prediction_type == "v_prediction" else weights / snr


def train_peer(recipe: PeerRecipe, dataset, minutes: float | None, seed: int, *, steps: int | None = None,
               progress: bool = True) -> tuple[PeerUNet, dict]:
    """Train the peer on ``dataset`` (a gmmcond dataset: image in [-1, 1], attributes, index) for ``steps`` steps
    when given, else for ``minutes`` of wall time from its first step; return its EMA weights in a model and what
    the training did (with the median seconds a step took, over all steps and over the second half: the peer warms
    up for tens of steps, so only the second one times a short run fairly)."""
    if steps is None and minutes is None:
        raise ValueError("train_peer needs minutes or steps")
    from diffusers.training_utils import EMAModel

    from ..data.cache import InMemory

    torch.manual_seed(seed)
    data = dataset if isinstance(dataset, InMemory) else InMemory(dataset, progress=progress)
    device = torch.device("cpu")
    model = PeerUNet(recipe, data.attrs.shape[1], data.size).to(device)
    ema = EMAModel(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                            eps=recipe.eps)
    scheduler = train_scheduler(recipe)
    gen = torch.Generator().manual_seed(seed)
    losses, durations, step, start = [], [], 0, time.time()
    bar = tqdm(desc="peer" + (f" ({minutes:.1f} min)" if steps is None else ""), total=steps, disable=not progress,
               unit="step")
    while step < steps if steps is not None else time.time() - start < minutes * 60:
        tic = time.perf_counter()
        x0, attrs, _ = data.batch(torch.randint(len(data), (recipe.batch_size,), generator=gen).tolist())
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(recipe.train_timesteps, (len(x0),), generator=gen)
        keep = (torch.rand(len(x0), 1, generator=gen) >= recipe.cond_dropout).float()
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if recipe.prediction_type == "v_prediction" else noise
        with autocast(device, recipe.precision):
            pred = model(noisy, t, as_condition(attrs) * keep)
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t, recipe.snr_gamma, recipe.prediction_type)).mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the peer's loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        opt.step()
        ema.step(model.parameters())
        losses.append(loss.item())
        durations.append(time.perf_counter() - tic)
        step += 1
        bar.update()
    bar.close()
    ema.copy_to(model.parameters())
    model.eval()
    tail = losses[-100:]
    # the steady time by the same rule the recipe's is (``median_seconds``), so a calibration compares like with like
    timed = {"sec_per_step_median": median_seconds(durations, "none"),
             "sec_per_step_steady": median_seconds(durations, "half")} if durations else {}
    return model, {"train_steps": step, "minutes": (time.time() - start) / 60,
                   "loss_last100": sum(tail) / max(1, len(tail)), "params": sum(p.numel() for p in model.parameters()),
                   **timed}


@dataclass
class PeerSampler:
    """The peer's DPM-Solver++ sampler with CFG, with the interface the evaluation scores a sampler by
    (:func:`gmmcond.eval.evaluate.evaluate_sampler`): batch i of a call seeded ``seed + i``."""

    model: PeerUNet
    recipe: PeerRecipe
    seed: int = 0
    batch: int = 64
    progress: bool = True

    def paired_latents(self, index: torch.Tensor) -> None:
        return None  # no latent is paired with a training row

    @torch.no_grad()
    def sample(self, attrs: torch.Tensor, seed: int) -> torch.Tensor:
        d = diffusers()
        scheduler = d.DPMSolverMultistepScheduler.from_config(train_scheduler(self.recipe).config)
        scheduler.set_timesteps(self.recipe.sample_steps)
        size = self.model.unet.config.sample_size
        x = torch.randn((len(attrs), 3, size, size), generator=torch.Generator().manual_seed(seed))
        x = x * scheduler.init_noise_sigma
        cond = torch.cat([as_condition(attrs), torch.zeros_like(attrs)])
        for t in scheduler.timesteps:
            with autocast(x.device, self.recipe.precision):
                out = self.model(torch.cat([x, x]), t.expand(2 * len(x)), cond).float()
            c, u = out.chunk(2)
            x = scheduler.step(u + self.recipe.cfg_scale * (c - u), t, x).prev_sample
        return x.clamp(-1, 1)

    def __call__(self, attrs: torch.Tensor, seed: int, desc: str, latents=None, progress: bool | None = None) -> torch.Tensor:
        show = self.progress if progress is None else progress
        chunks = attrs.split(self.batch)
        return torch.cat([self.sample(chunk, seed + i) for i, chunk in enumerate(tqdm(chunks, desc=desc, disable=not show))])


# steps timed of each before a calibrated peer trains, each the median of its second half: the peer's first tens of
# steps run slower than its steady ones (AMX Xeon, seed 0: a median 0.52 s a step over 60 steps, 0.35 s past step 100)
CALIBRATION_STEPS = {"run": 150, "peer": 150}


def peer_vs_runs(runs: list, recipe: PeerRecipe | None = None, *, minutes: float | None = None, calibrate: bool = False,
                 n: int = 512, out: Path = Path("runs/benchmark"), log=print) -> dict:
    """For each trained gmmcond run (seeds of one recipe; seed i of the peer beside run i): train the peer on the
    run's data for the run's training time and score both by the evaluation's defaults (n samples, 6 sets x 48,
    memorisation on 256 rows). The training time is ``minutes`` if given, else the run's own minutes at its median
    step time (time the run lost to other work is not handed to the peer); with ``calibrate``, the peer trains
    instead for the steps it makes in the time the run's steps take on this machine now, both step times measured
    back to back just before (:data:`CALIBRATION_STEPS`), so a host whose speed has drifted since the run trained,
    or that other work shares, hands the peer neither more nor less than the run had. The run's own evaluation is
    the sampler-budget one of its recipe setting (RUN/sampler_budget.jsonl; computed there if absent). Resumable
    per run: OUT/peer.jsonl."""
    from ..config import load_config
    from ..eval.evaluate import EvalSize, eval_summary, evaluate_sampler
    from ..io import ResultLog, read_metrics
    from ..registry import DATASETS
    from ..sampling.settings import SamplingSettings
    from .benchmarks import (RECIPE_SETTING, SAMPLER_BUDGET, model_calls, sampler_budget, steady_minutes,
                             step_seconds_now)
    from .runner import summarise_records

    recipe = recipe or PeerRecipe()
    recipe_setting = RECIPE_SETTING
    peer_log = ResultLog(Path(out) / "peer.jsonl")
    mine, theirs = [], []
    for seed, run in enumerate(map(Path, runs)):
        own = sampler_budget([run], [recipe_setting], n=n, log=log)["settings"][recipe_setting]["per_seed"][0]
        budget = minutes or steady_minutes(read_metrics(run / "metrics.jsonl"))

        def compute(run=run, seed=seed, budget=budget, run_steps=own["step"]) -> dict:
            cfg = load_config(run / "config.yaml")
            data = DATASETS.build(cfg["dataset"])
            timing = {}
            if calibrate:
                log(f"peer: seed {seed}, timing {CALIBRATION_STEPS['run']} steps of {run}'s recipe and "
                    f"{CALIBRATION_STEPS['peer']} of the peer's on this machine now")
                run_s = step_seconds_now(cfg, CALIBRATION_STEPS["run"])
                peer_s = train_peer(recipe, data, None, seed, steps=CALIBRATION_STEPS["peer"])[1]["sec_per_step_steady"]
                steps = round(run_steps * run_s / peer_s)
                timing = {"calibrated": {"run_sec_per_step": run_s, "peer_sec_per_step": peer_s, "peer_steps": steps,
                                         "run_minutes_now": run_steps * run_s / 60}}
                log(f"peer: seed {seed}, {steps} steps beside {run} ({run_steps} steps at {run_s:.3f} s against "
                    f"{peer_s:.3f} s a peer step)")
                model, trained = train_peer(recipe, data, None, seed, steps=steps)
            else:
                log(f"peer: seed {seed}, {budget:.1f} minutes beside {run}")
                model, trained = train_peer(recipe, data, budget, seed)
            tic = time.time()
            scored = evaluate_sampler(PeerSampler(model, recipe, seed=cfg["sample"].get("seed", 0)), cfg["dataset"],
                                      EvalSize(n=n), progress=False)
            return {**trained, **timing, "eval_seconds": time.time() - tic, **eval_summary(scored.result)}

        rec = peer_log.once({"run": str(run), "seed": seed, "n": n,
                             "budget": "calibrated" if calibrate else round(budget, 3),
                             "recipe": repr(asdict(recipe))}, compute)
        mine.append({**own, "seed": seed, "minutes": budget, "train_steps": own["step"]})
        # the calibration's timings beside the scores (the summary keeps numbers only, not nested records)
        theirs.append({**rec, **{f"calibrated_{k}": v for k, v in rec.get("calibrated", {}).items()}, "seed": seed})
    return {"runs": [str(r) for r in runs], "n": n, "recipe": asdict(recipe), "settings": {
        f"gmmcond ({recipe_setting})": {"model_calls": model_calls(SamplingSettings(**SAMPLER_BUDGET[recipe_setting])),
                                        **summarise_records(mine)},
        f"diffusers UNet2DModel (peer), DPM-Solver++ {recipe.sample_steps} steps, CFG {recipe.cfg_scale:g}": {
            "model_calls": recipe.model_calls, **summarise_records(theirs)}}}
