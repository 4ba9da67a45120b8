import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from gmmcond.errors import RunError
from gmmcond.io import load_checkpoint
from gmmcond.modeling.runs import load_run
from gmmcond.engine.trainer import StepBatchSampler, train

ROOT = Path(__file__).resolve().parent.parent


def read_metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_three_step_run_writes_grid_metrics_checkpoint_export(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    assert all(m["loss"] > 0 for m in read_metrics(run))
    # one step per log line: the pre-clip norm, and whether it exceeded train.grad_clip (1.0)
    assert all(m["grad_norm"] > 0 and m["grad_clipped"] == float(m["grad_norm"] > 1.0) for m in read_metrics(run))
    assert (run / "samples" / "grid_0000003.png").exists() and (run / "plots" / "loss.png").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003.pt"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step_0000002.pt", "step_0000003.pt"]
    assert json.loads((run / "dataset.json").read_text())["attr_names"][:3] == ["circle", "square", "triangle"]
    from safetensors import safe_open

    with safe_open(run / "ema.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["name"] == "shapes_tiny" and meta["step"] == "3"
    with pytest.raises(RunError, match="pass --resume"):
        train(tiny_cfg(), run)


def test_bookkeeping_settings_leave_the_trained_weights_and_the_loss_curve_unchanged(tiny_cfg, tmp_path):
    """What ``reproduce.BOOKKEEPING`` names (grid and checkpoint cadence, grid rows) may differ between two runs
    an experiment treats as one: a grid every step and a checkpoint every step against neither, bit for bit."""
    from gmmcond.experiments.runner import BOOKKEEPING

    assert {"train.grid_every", "train.checkpoint_every"} <= set(BOOKKEEPING)
    busy = tiny_cfg("train.steps=4", "train.grid_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                    "sample.grid_cols=3", "conditioner.cond_dropout=0.5")
    quiet = tiny_cfg("train.steps=4", "train.grid_every=0", "train.checkpoint_every=4", "conditioner.cond_dropout=0.5")
    train(busy, tmp_path / "busy")
    train(quiet, tmp_path / "quiet")
    assert len(list((tmp_path / "busy" / "samples").glob("grid_*.png"))) == 4  # the grids were drawn
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "step_0000004.pt") for r in ("busy", "quiet"))
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")} for m in read_metrics(run)]
    assert timeless(tmp_path / "busy") == timeless(tmp_path / "quiet")


def test_a_run_loads_its_live_weights_or_its_ema_weights(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    state = load_checkpoint(run / "checkpoints" / "step_0000003.pt")
    live = load_run(run, weights="live")
    assert live.source.name == "step_0000003.pt" and live.step == 3  # never the export, which holds the EMA only
    got = live.parts.denoiser.inner_model.state_dict()
    assert got.keys() == state["ema"].keys()
    assert all(torch.equal(got[k], state["model"]["denoiser.inner_model." + k]) for k in got)
    ema = load_run(run).parts.denoiser.inner_model.state_dict()
    assert all(torch.equal(ema[k], state["ema"][k]) for k in ema)
    assert any(not torch.equal(ema[k], got[k]) for k in ema)  # three steps of training moved the live weights
    with pytest.raises(RunError, match="weights must be 'ema', 'live' or 'posthoc:SIGMA_REL'"):
        load_run(run, weights="raw")


def test_step_batch_sampler_is_a_function_of_step_and_shards_disjointly():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, steps=6))
    assert list(StepBatchSampler(10, 4, seed=3, start_step=4, steps=6)) == full[4:]
    flat = [i for b in full[:5] for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    ranks = [list(StepBatchSampler(10, 4, 3, 0, 6, rank=r, world=2)) for r in range(2)]
    for step in range(6):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(full[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_foreach_ema_update_is_k_diffusions_bit_for_bit(tiny_cfg):
    import k_diffusion as K

    from gmmcond.engine.trainer import EMAUpdate, ema_copy
    from gmmcond.modeling.build import build

    torch.manual_seed(0)
    model = build(tiny_cfg()).denoiser
    ours, theirs = ema_copy(model), ema_copy(model)
    update = EMAUpdate(model, ours)
    for decay in (0.0, 0.5, 0.9, 0.999):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        update(decay)
        K.utils.ema_update(model, theirs, decay)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_in_memory_dataset_returns_the_renderers_items_exactly():
    from gmmcond.data.cache import in_memory
    from gmmcond.data.shapes import ShapesDataset

    data = ShapesDataset(length=64)
    cached = in_memory(data, progress=False)
    assert len(cached) == 64 and cached.images.dtype == torch.uint8
    images, attrs, index = cached.batch([5, 0, 63, 5])
    for j, i in enumerate([5, 0, 63, 5]):
        image, a, k = data[i]
        assert torch.equal(images[j], image) and torch.equal(attrs[j], a) and index[j] == k
        assert torch.equal(cached[i][0], image)
    assert in_memory(ShapesDataset(length=10**9)) is None  # too large to hold: stays on the renderer


def test_uncertainty_weighting_is_k_diffusions_variance_loss_and_trains_and_samples(tiny_cfg, tmp_path):
    """``denoiser.loss: uncertainty`` with ``model.has_variance: true`` is k-diffusion's DenoiserWithVariance: the
    Karras loss over a learned variance plus its log, the log-variance the mean of the model's extra channel."""
    import k_diffusion as K

    from gmmcond.errors import ConfigError
    from gmmcond.modeling.build import build

    parts = build(tiny_cfg("model.has_variance=true", "denoiser.loss=uncertainty"))
    den = parts.denoiser
    assert type(den) is K.layers.DenoiserWithVariance
    torch.manual_seed(0)
    x, noise, sigma = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.tensor([0.1, 0.5, 1.0, 5.0])
    cond = parts.conditioner.eval()(torch.ones(4, parts.conditioner.num_attrs), torch.arange(4))
    c_skip, c_out, c_in = [K.utils.append_dims(c, 4) for c in den.get_scalings(sigma)]
    noised = x + noise * sigma[:, None, None, None]
    raw = den.inner_model(noised * c_in, sigma, mapping_cond=cond)  # without return_variance: the image channels only
    out, logvar = den.inner_model(noised * c_in, sigma, mapping_cond=cond, return_variance=True)
    assert raw.shape == out.shape == x.shape and logvar.shape == (4,)
    target = (x - c_skip * noised) / c_out
    expected = (((out - target) ** 2).flatten(1).mean(1) / logvar.exp() + logvar) / 2
    torch.testing.assert_close(den.loss(x, noise, sigma, mapping_cond=cond), expected)
    for overrides in (["denoiser.loss=uncertainty"], ["model.has_variance=true"]):
        with pytest.raises(ConfigError, match="go together"):
            build(tiny_cfg(*overrides))
    run = tmp_path / "run"
    train(tiny_cfg("model.has_variance=true", "denoiser.loss=uncertainty"), run)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in read_metrics(run))
    assert load_run(run).parts.denoiser(torch.randn(2, 3, 16, 16), torch.ones(2),
                                        mapping_cond=cond[:2]).shape == (2, 3, 16, 16)


def test_fused_adamw_takes_the_foreach_steps_up_to_rounding_and_a_run_resumes_across_them(tiny_cfg, tmp_path):
    """`train.adamw_impl=fused` (torch's one-kernel AdamW) against the default foreach AdamW: the same weights up to
    rounding after four steps, and a foreach run resumes with the fused kernel (same optimiser state layout)."""
    train(tiny_cfg("train.steps=4"), tmp_path / "foreach")
    train(tiny_cfg("train.steps=4", "train.adamw_impl=fused"), tmp_path / "fused")
    foreach = load_checkpoint(tmp_path / "foreach" / "checkpoints" / "step_0000004.pt")
    fused = load_checkpoint(tmp_path / "fused" / "checkpoints" / "step_0000004.pt")
    assert fused["config"]["train"]["adamw_impl"] == "fused"
    for name, value in foreach["model"].items():
        torch.testing.assert_close(fused["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # and the fused kernel did run: it rounds differently (14 of the 47 tensors differ here, by at most 2e-10)
    assert any(not torch.equal(fused["model"][name], value) for name, value in foreach["model"].items())
    for name, value in foreach["opt"]["state"].items():
        for key in value:
            torch.testing.assert_close(fused["opt"]["state"][name][key], value[key], rtol=1e-3, atol=1e-9)
    train(tiny_cfg("train.steps=5", "train.adamw_impl=fused"), tmp_path / "foreach", resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "foreach")] == [1, 2, 3, 4, 5]
    history = load_checkpoint(tmp_path / "foreach" / "checkpoints" / "step_0000005.pt")["config"]["history"]
    assert history[-1]["changed"]["train.adamw_impl"] == {"from": "foreach", "to": "fused"}


def test_fitted_steps_take_the_budget_share_left_at_the_measured_step_time():
    from gmmcond.engine.trainer import BUDGET_SHARE, fitted_steps

    assert fitted_steps(100.0, 0.5, 20, 10**6) == 20 + int(BUDGET_SHARE * 100.0 / 0.5)
    assert fitted_steps(100.0, 0.5, 20, 50) == 50  # train.steps caps it
    assert fitted_steps(-5.0, 0.5, 20, 50) == 21  # a spent budget still finishes the step it is on


def test_train_minutes_fits_the_steps_records_them_and_train_steps_reproduces_the_run(tiny_cfg, tmp_path, monkeypatch):
    """train.minutes: the step count is fitted to the budget at the end of the warm-up (so the lr schedule is that
    of the fitted train.steps throughout), the run stops there, config.yaml records the fitted steps, and
    train.steps=N with train.minutes off trains the same weights bit for bit."""
    from gmmcond.engine import trainer

    monkeypatch.setattr(trainer, "BUDGET_CALIBRATION_SHARE", math.inf)  # however slow the machine: at the warm-up's end
    common = ("train.warmup_steps=40", "train.checkpoint_every=1000", "train.log_every=1", "train.grid_every=0")
    budget = train(tiny_cfg("train.minutes=0.03", "train.steps=500", *common), tmp_path / "budget")
    cfg = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())
    fitted = cfg["history"][-1]["fitted"]
    n = cfg["train"]["steps"]
    assert fitted["train.steps"] == {"from": 500, "to": n} and 41 <= n < 500 and fitted["sec_per_step"] > 0
    assert cfg["history"][-1]["step"] == 40  # fitted at the end of the warm-up
    assert budget["step"] == n and read_metrics(tmp_path / "budget")[-1]["step"] == n
    train(tiny_cfg(f"train.steps={n}", *common), tmp_path / "steps")
    a = load_checkpoint(tmp_path / "budget" / "checkpoints" / f"step_{n:07d}.pt")
    b = load_checkpoint(tmp_path / "steps" / "checkpoints" / f"step_{n:07d}.pt")
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())
    assert [m["loss"] for m in read_metrics(tmp_path / "budget")] == [m["loss"] for m in read_metrics(tmp_path / "steps")]


def test_a_long_warm_up_is_not_waited_for_once_the_timed_steps_took_their_share_of_the_budget(tiny_cfg, tmp_path,
                                                                                             monkeypatch):
    from gmmcond.engine import trainer

    monkeypatch.setattr(trainer, "BUDGET_CALIBRATION_SHARE", 0.0)  # any time taken is the share: fit at the minimum
    train(tiny_cfg("train.minutes=0.03", "train.steps=500", "train.warmup_steps=400", "train.checkpoint_every=1000",
                   "train.grid_every=0"), tmp_path / "run")
    history = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["history"]
    assert history[-1]["step"] == 1 + trainer.BUDGET_CALIBRATION_STEPS


def test_a_budgeted_run_resumes_to_its_fitted_steps_with_the_minutes_left(tiny_cfg, tmp_path, monkeypatch):
    """Killed after the steps were fitted, a budgeted run resumes to the fitted step count (recorded in its
    checkpoint with the training seconds so far), not to the cap; a spent budget is a one-line error. The fit
    itself is pinned to 10 steps past the calibration (its arithmetic is tested above), so a slow or busy machine
    cannot fit fewer steps than the kill needs."""
    from gmmcond.engine import trainer

    monkeypatch.setattr(trainer, "fitted_steps", lambda budget_s, sec_per_step, done, cap: min(cap, done + 10))
    monkeypatch.setattr(trainer, "BUDGET_CALIBRATION_SHARE", math.inf)  # fitted at the warm-up's end, step 40
    overrides = ("train.minutes=5", "train.steps=500", "train.warmup_steps=40", "train.checkpoint_every=5",
                 "train.grid_every=0")

    class Killed(Exception):
        pass

    def kill_at_47(step, metrics):
        if step == 47:  # fitted to 50 (at the warm-up's end, step 40); dies with its last checkpoint at step 45
            raise Killed

    with pytest.raises(Killed):
        train(tiny_cfg(*overrides), tmp_path / "run", on_step=kill_at_47)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000045.pt")
    assert state["fitted"] == 50 and state["elapsed"] > 0
    last = train(tiny_cfg(*overrides), tmp_path / "run", resume=True)
    assert last["step"] == state["fitted"]
    spent = dict(state, elapsed=10.0**6)
    torch.save(spent, tmp_path / "spent.pt")
    with pytest.raises(RunError, match=r"train.minutes=5 is spent"):
        train(tiny_cfg(*overrides), tmp_path / "other", resume=str(tmp_path / "spent.pt"))


def test_immiscible_noise_is_the_least_distance_permutation_of_the_draws():
    import itertools

    from gmmcond.modeling.objective import immiscible_noise

    torch.manual_seed(0)
    images, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    out = immiscible_noise(images, noise)
    cost = lambda n: (images - n).pow(2).sum().item()  # noqa: E731
    best = min(cost(noise[list(p)]) for p in itertools.permutations(range(6)))  # brute force over all 720
    assert abs(cost(out) - best) < 1e-9 and cost(out) <= cost(noise)
    assert sorted(map(tuple, out.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))  # each draw once


def test_the_trainer_assigns_the_noise_when_asked(tiny_cfg, tmp_path):
    from gmmcond.io import read_metrics

    losses = {}
    for on in (False, True):
        train(tiny_cfg(f"train.immiscible={str(on).lower()}", "train.steps=2", "train.log_every=1"), tmp_path / str(on))
        losses[on] = [r["loss"] for r in read_metrics(tmp_path / str(on) / "metrics.jsonl")]
    assert all(map(math.isfinite, losses[True])) and losses[True][0] != losses[False][0]  # same draws, reassigned


def test_sigma_data_measured_on_the_data_is_the_images_std_recorded_and_resumed(tiny_cfg, tmp_path):
    import numpy as np

    from gmmcond.data import measure_sigma_data
    from gmmcond.registry import DATASETS

    cfg = tiny_cfg("denoiser.sigma_data=data")
    dataset = DATASETS.build(cfg["dataset"])
    pixels = np.stack([dataset[i][0].numpy() for i in range(len(dataset))]).astype(np.float64)
    assert measure_sigma_data(dataset) == round(float(pixels.std(ddof=1)), 2)
    evenly_spaced = np.stack([dataset[i][0].numpy() for i in (0, 85, 170, 255)]).astype(np.float64)
    assert measure_sigma_data(dataset, max_items=4) == round(float(evenly_spaced.std(ddof=1)), 2)
    run = tmp_path / "run"
    train(tiny_cfg("denoiser.sigma_data=data", "train.steps=2"), run)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["denoiser"]["sigma_data"]
    assert recorded == measure_sigma_data(dataset) != 0.5
    assert load_run(run).parts.denoiser.sigma_data == recorded
    train(tiny_cfg("denoiser.sigma_data=data", "train.steps=3"), run, resume=True)  # measured again: the same run
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    with pytest.raises(RunError, match="different denoiser settings"):
        train(tiny_cfg("denoiser.sigma_data=0.5", "train.steps=4"), run, resume=True)
