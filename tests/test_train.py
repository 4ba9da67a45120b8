import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmmcond.errors import CheckpointError, RunError, TrainingDiverged
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


class Killed(Exception):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=6", "train.checkpoint_every=2", "conditioner.cond_dropout=0.5")
    train(cfg, tmp_path / "full")

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # dies after step 5 ran, with the last checkpoint at step 4

    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", on_step=kill_at_5)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_0000004.pt"
    train(cfg, tmp_path / "cut", resume=True)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000006.pt")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000006.pt")
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, cut[key][name]), (key, name)
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")} for m in read_metrics(run)]
    assert timeless(tmp_path / "cut") == timeless(tmp_path / "full")  # same loss at the same step


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


def test_corrupt_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    latest = run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_0000003.pt is corrupt or truncated .*earlier one \(\['step_0000002.pt'\]\)"):
        train(tiny_cfg("train.steps=4"), run, resume=True)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_run(run, checkpoint=latest)
    assert load_run(run).source.name == "ema.safetensors"  # sampling needs only the export, which is intact


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
    with pytest.raises(RunError, match="weights must be 'ema' or 'live'"):
        load_run(run, weights="raw")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    from gmmcond.modeling.schedules import KarrasSchedule

    real = KarrasSchedule.sample_sigmas
    calls = {"n": 0}

    def poisoned(self, n, generator=None):
        calls["n"] += 1
        sigmas = real(self, n, generator)
        return sigmas * float("nan") if calls["n"] == 3 else sigmas

    monkeypatch.setattr(KarrasSchedule, "sample_sigmas", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3; .* the last good checkpoint \(taken before the loss left its range\) is .*step_0000002.pt"):
        train(tiny_cfg(), run)
    state = load_checkpoint(run / "checkpoints" / "step_0000002.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_step_batch_sampler_is_a_function_of_step_and_shards_disjointly():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, steps=6))
    assert list(StepBatchSampler(10, 4, seed=3, start_step=4, steps=6)) == full[4:]
    flat = [i for b in full[:5] for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    ranks = [list(StepBatchSampler(10, 4, 3, 0, 6, rank=r, world=2)) for r in range(2)]
    for step in range(6):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(full[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_two_process_run_stays_in_sync_and_writes_each_file_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "launch" / "train.py"), "--config", "shapes_tiny", "--runs", str(tmp_path), "train.steps=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "2 process(es)" in out and "parameters identical across 2 processes" in out
    run = tmp_path / "shapes_tiny"
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002.pt", "step_0000004.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["grid_0000004.png"]
    assert len(load_checkpoint(run / "checkpoints" / "step_0000004.pt")["rng"]) == 2


def run_sample(*args):
    cmd = [sys.executable, str(ROOT / "launch" / "sample.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_sample_cli_writes_grids_lists_valid_attributes_and_exports(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("head=bottleneck_attrs"), run)
    bad = run_sample("--run", run, "--attrs", "circle,purple")
    assert bad.returncode == 2
    assert "unknown attribute(s) ['purple'] in 'circle,purple'; valid attributes: circle, square, triangle, red, green, blue" in bad.stderr
    for mode in ("latents", "fixed-latent", "x0-strip"):
        ok = run_sample("--run", run, "--attrs", "circle,red", "--n", 2, "--steps", 3, "--mode", mode, "--head-scale", 1.0,
                        "--cfg-scale", 2.0, "--export", tmp_path / "ema.safetensors")  # head guidance and CFG together
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert (run / "samples" / f"{mode}_circle-red.png").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "ema.safetensors", "pt") as f:
        assert json.loads(f.metadata()["config"])["head"]["type"] == "bottleneck_attrs"
        parts = load_run(run).parts
        expected = set(parts.denoiser.inner_model.state_dict()) | {f"head.{k}" for k in parts.head.state_dict()}
        assert set(f.keys()) == expected


def test_resume_with_a_different_model_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "run")
    with pytest.raises(RunError, match=r"trained with different model settings; resume with the run's own config"):
        train(tiny_cfg("train.steps=5", "model.channels=[8,32]"), tmp_path / "run", resume=True)


def test_sample_cli_leaves_attributes_open_and_composes_on_an_attr_dropout_run(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("conditioner.attr_dropout=0.25"), run)
    assert load_run(run).parts.conditioner.partial
    for args in (("--attrs", "circle,~red", "--open", "model"), ("--compose", "circle:2,red:-1")):
        ok = run_sample("--run", run, *args, "--n", 2, "--steps", 3)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "note:" not in ok.stdout
    assert "'circle,~red': left open (hidden by the model, trained with attr_dropout): green, blue, large" in \
        run_sample("--run", run, "--attrs", "circle,~red", "--open", "model", "--n", 2, "--steps", 3).stdout
    assert (run / "samples" / "latents_circle-red.png").exists() and (run / "samples" / "latents_circle-2-red-1.png").exists()
    bad = run_sample("--run", run, "--compose", "circle:2,purple:1")
    assert bad.returncode == 2 and "purple" in bad.stderr and "Traceback" not in bad.stderr


def test_sample_cli_says_what_an_open_attribute_meant(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    ok = run_sample("--run", run, "--attrs", "circle,~red", "--n", 2, "--steps", 3, "--open", "absent")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "'circle,~red': open attributes taken as absent (open=absent): green, blue, large, left" in ok.stdout
    ok = run_sample("--run", run, "--attrs", "circle,~red", "--n", 2, "--steps", 3)  # open=data, the default
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "'circle,~red': open attributes drawn from the data, frequency over 2 samples: green" in ok.stdout


def test_sweep_evaluates_each_point_once_and_resumes(tiny_cfg, tmp_path, monkeypatch):
    from gmmcond.eval import evaluate, sweep

    run = tmp_path / "run"
    train(tiny_cfg(), run)
    calls = []
    real = evaluate.evaluate_run

    def counted(*args, **kw):
        calls.append(args[1]["cfg_scale"])  # the sampling overrides
        return real(*args, **kw)

    monkeypatch.setattr(evaluate, "evaluate_run", counted)
    kw = dict(n=6, sets=0, samplers={"euler": {"type": "euler"}}, scales=(1.0, 2.0), progress=lambda *_: None)
    first = sweep.sweep(run, **kw)
    assert calls == [1.0, 2.0] and [p["cfg_scale"] for p in first["points"]] == [1.0, 2.0]
    assert 0 <= first["points"][0]["attr_accuracy"] <= 1 and "recall" in first["points"][0]["references"]
    again = sweep.sweep(run, **kw)  # a re-run reads the finished points and evaluates nothing
    assert calls == [1.0, 2.0] and again["points"] == first["points"]
    assert (run / "sweep.png").exists() and (run / "sweep.json").exists()


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


def test_quality_over_time_evaluates_each_mark_once_and_reads_minutes_from_metrics(tiny_cfg, tmp_path, monkeypatch):
    from gmmcond.eval import evaluate
    from gmmcond.experiments import benchmarks

    assert benchmarks.training_minutes([{"step": 10, "sec_per_step": 6.0}, {"step": 20, "sec_per_step": 3.0}]) == {10: 1.0, 20: 1.5}
    calls = []
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **kw: calls.append(kw["checkpoint"].name) or real(*a, **kw))
    cfg = tiny_cfg("train.steps=4")
    kw = dict(every=2, n=8, per_set=6, log=lambda *_: None)
    first = benchmarks.quality_over_time(cfg, tmp_path / "q", **kw)
    assert [m["step"] for m in first["marks"]] == [2, 4] and calls == ["step_0000002.pt", "step_0000004.pt"]
    assert all(0 <= m["all_attributes_correct"] <= 1 and m["minutes"] > 0 for m in first["marks"])
    again = benchmarks.quality_over_time(cfg, tmp_path / "q", **kw)  # read back, nothing retrained or re-evaluated
    assert len(calls) == 2 and again["marks"] == first["marks"]
    benchmarks.plot_quality(first, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0 and "| 4 |" in benchmarks.quality_table(first)


def test_the_step_profile_sees_every_labelled_phase(tiny_cfg):
    from gmmcond.experiments import benchmarks

    result = benchmarks.profile_training(tiny_cfg(), warmup=2, active=4)
    assert set(result["phases_ms"]) == set(benchmarks.PHASES)
    assert all(v > 0 for v in result["phases_ms"].values()), result["phases_ms"]
    assert result["op_self_ms_by_kind"]["convolutions and matmuls"] > 0
    assert "| phase: ema |" in benchmarks.profile_table([result])


def test_resume_previous_after_a_corrupt_latest_checkpoint(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)  # checkpoints at steps 2 and 3
    latest = run / "checkpoints" / "step_0000003.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"--resume-from PATH"):
        train(tiny_cfg("train.steps=4"), run, resume=True)
    last = train(tiny_cfg("train.steps=4"), run, resume="previous")
    assert last["step"] == 4
    assert load_run(run).step == 4


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


def test_a_checkpoint_from_before_a_new_setting_resumes(tiny_cfg, tmp_path):
    """A checkpoint whose config lacks settings added later (model.has_variance, train.adamw_impl) resumes: they
    take their defaults, as when the run is loaded; a real model change is still refused (test above)."""
    from gmmcond.io import save_checkpoint

    run = tmp_path / "run"
    train(tiny_cfg("train.steps=2"), run)
    path = run / "checkpoints" / "step_0000002.pt"
    state = load_checkpoint(path)
    del state["config"]["model"]["has_variance"], state["config"]["train"]["adamw_impl"]
    path.unlink()
    save_checkpoint(run, 2, state)
    train(tiny_cfg("train.steps=3", "train.adamw_impl=fused"), run, resume=True)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    # a new train setting counts at its default in the old run, so setting it at resume is a recorded change
    history = load_checkpoint(run / "checkpoints" / "step_0000003.pt")["config"]["history"]
    assert history == [{"step": 2, "changed": {"train.adamw_impl": {"from": "foreach", "to": "fused"},
                                               "train.steps": {"from": 2, "to": 3}}}]


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
