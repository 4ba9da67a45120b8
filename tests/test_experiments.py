"""The experiment runner and registry: arms keyed by their full config, resumable, shared where they train alike,
taken over from another experiment's log, and each experiment scored end to end at a toy scale."""

import math

import pytest

from gmmcond.errors import ConfigError


def test_an_experiment_runs_only_the_arms_named_and_rejects_an_unknown_one():
    from gmmcond.experiments.reproduce import DISTRIBUTION_ARMS
    from gmmcond.experiments.runner import select_arms

    picked = select_arms(DISTRIBUTION_ARMS, ["gmm_attrs, fixed pairing (paper)", "fixed value (attrs)"])
    assert list(picked) == ["fixed value (attrs)", "gmm_attrs, fixed pairing (paper)"]  # the table's order
    assert select_arms(DISTRIBUTION_ARMS, None) == DISTRIBUTION_ARMS
    with pytest.raises(ConfigError, match=r"unknown arm\(s\) \['fixed pairing'\]; this experiment's arms are: "
                                          r"'fixed value \(attrs\)'"):
        select_arms(DISTRIBUTION_ARMS, ["fixed pairing"])


@pytest.mark.parametrize("arm", ["features + per-sample dropout + CoInD", "features, open from data"])
def test_the_combination_experiment_scores_an_arm_end_to_end(tmp_path, arm):
    """One arm at a toy scale (3 steps of a small model): every number the README table shows is produced."""
    from gmmcond.experiments.reproduce import combination_arms, combination_scores

    recipe, overrides = combination_arms(3)[arm]
    tiny = ["model.channels=[8,8,8]", "model.depths=[1,1,1]", "model.mapping_out=16", "sample.steps=2",
            "train.batch_size=8", "train.checkpoint_every=3", "dataset.length=512"]
    rec = combination_scores(arm, 0, recipe, [*overrides, *tiny], tmp_path / "run", 4, out=tmp_path / "combinations.png")
    assert rec["steps"] == 3 and rec["per"] == 4
    for key in ("conformity_seen", "conformity_held_out", "defects_seen", "defects_held_out", "negation_conformity",
                "unspecified_tv_max", "free_error_seen", "free_floor_seen", "free_error_held_out", "free_floor_held_out",
                "single_negation_conformity", "single_negation_error", "single_negation_floor"):
        assert 0 <= rec[key] <= 1, key
    assert rec["spread_seen"] > 0 and rec["spread_held_out"] > 0
    if "CoInD" in arm:
        assert 0 <= rec["jsd_triangle_red"] <= math.log(2) and 0 <= rec["jsd_circle_red"] <= math.log(2)
    else:  # the data arm asks a model without attr_dropout: no JSD (it cannot hide attributes)
        assert "jsd_triangle_red" not in rec
    slug = arm.replace(",", "").replace(" ", "_").replace("+", "and")
    assert (tmp_path / f"combinations_{slug}.png").exists()


def test_arms_that_differ_only_in_sampling_share_one_training(tmp_path, monkeypatch):
    """The composed, all-specified and all-unknown-CFG arms ask the attr_dropout model differently: they reuse its
    run folder instead of training it again, and are still logged under their own configs; each swept
    attr_dropout rate's two arms share that rate's run; every other arm trains its own."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.reproduce import ResultLog, combination_arms, combination_training, combinations
    from gmmcond.experiments.runner import Options

    joint, cfg_arm = "features + attr_dropout joint", "features + attr_dropout, CFG from all-unknown"
    samplers = (*reproduce.COMPOSED_WEIGHTS, cfg_arm, "features + attr_dropout, all specified",
                "features + attr_dropout, open from data")
    owners, arms = combination_training(), combination_arms(500, "recipe")
    assert all(owners[a] == joint for a in samplers) and all(arms[a] == arms[joint] for a in samplers if a != cfg_arm)
    assert arms[cfg_arm][1] == [*arms[joint][1], "sample.cfg_null=all_unknown"]
    # a composed arm asks with its own per-term weights
    from gmmcond.data.shapes import ShapesDataset
    from gmmcond.registry import DATASETS
    test, plain = DATASETS.build({"type": "shapes", "size": 16, "split": "test", "length": 512}), ShapesDataset()
    names = plain.attr_names
    _, _, compose = reproduce._combination_requests(test, names, plain.groups, "triangle", "red", "composed",
                                                    reproduce.combination_indices(test, "triangle", "red", 4), (3.0, 1.0))
    assert compose == [(names.index("triangle"), 3.0), (names.index("red"), 1.0)]
    seen = []
    monkeypatch.setattr(reproduce, "combination_scores",  # no training: record which run folder each arm gets
                        lambda arm, seed, recipe, full, run, per, out: seen.append((arm, run)) or {"x": 1.0})
    combinations(Options(tmp_path, seeds=1, steps=500, n=64, scale="recipe"))
    runs = dict(seen)
    assert set(runs) == set(arms) and all(runs[a] == runs[joint] for a in samplers)
    # the rate sweep: each rate's model asked two ways shares its own run, not the default rate's
    for rate in ("0.1", "0.5"):
        own = runs[f"features + attr_dropout {rate} joint"]
        assert runs[f"features + attr_dropout {rate}, all specified"] == own != runs[joint]
    # the plain model asked for shape and colour with the rest drawn from the data is the "features joint" training
    assert owners["features, open from data"] == "features joint" and runs["features, open from data"] == runs["features joint"]
    # the token arms: each conditioner's model asked two ways shares one run
    for pooled in ("", " + pooled"):
        assert runs[f"tokens{pooled}, open from data"] == runs[f"tokens{pooled} joint"] != runs["features joint"]
    assert len(set(runs.values())) == len(set(owners.values())) == len(arms) - len(samplers) - 5
    assert {r["arm"] for r in ResultLog(tmp_path / "combinations.jsonl").records} == set(arms)
    # --no-train tabulates what is logged and starts nothing: seed 1 is missing, each row says it has one seed
    monkeypatch.setattr(reproduce, "combination_scores", lambda *a, **k: pytest.fail("--no-train trained an arm"))
    table = combinations(Options(tmp_path, seeds=2, steps=500, n=64, scale="recipe", train=False))
    assert set(table["arms"]) == set(arms) and all(a["x"]["n"] == 1 for a in table["arms"].values())


def test_an_arm_another_experiment_already_ran_is_reused_not_retrained(tmp_path, monkeypatch):
    """Fig. 9's "no head" at the recipe scale is Fig. 7's "features" (same resolved config but for the grid
    cadence, same evaluation): with Fig. 7's log passed as ``reuse`` it is logged from there, the head arms
    train; a log evaluated with another n, or a record without a key, is not taken."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.reproduce import HEAD_ARMS, ResultLog, features_vs_classes, head
    from gmmcond.experiments.runner import Options, result_key

    trained = []

    def fake(recipe, full, run, *, n):  # no training: record what would have trained, return a loss to log
        trained.append((recipe, tuple(full), n))
        from gmmcond.data.shapes import COLOURS, SHAPES

        return {"last100": 0.01 * len(trained), "curve_steps": [1], "curve": [0.1],
                "per_attribute": dict.fromkeys((*SHAPES, *COLOURS), 1.0)}

    monkeypatch.setattr(reproduce, "train_and_evaluate", fake)
    monkeypatch.setattr(reproduce, "plot_loss_bands", lambda *a, **k: None)
    features_vs_classes(Options(tmp_path, seeds=2, steps=6000, n=256, scale="recipe"))
    assert len(trained) == 6
    fvc = ResultLog(tmp_path / "features-vs-classes.jsonl")
    trained.clear()
    head(Options(tmp_path, seeds=2, steps=6000, n=256, scale="recipe", reuse=(fvc,)))
    assert len(trained) == 4 and all("head=none" not in full for _, full, _ in trained)  # only the two head arms
    log = ResultLog(tmp_path / "head.jsonl")
    for seed in range(2):
        mine = log.done(("arm", "seed"), arm="no head", seed=seed)
        theirs = fvc.done(("arm", "seed"), arm="features (11)", seed=seed)
        assert mine["reused_from"] == theirs["config"] and mine["last100"] == theirs["last100"]
        assert mine["run"] == theirs["run"] and mine["config"] != theirs["config"]  # logged under its own config
    # the key ignores the grid cadence, not what trains or how it is evaluated
    base = ["train.steps=6000", "train.seed=0", "conditioner.seed=0"]
    key = result_key("shapes", base, "train_and_evaluate n=256")
    assert key == result_key("shapes", [*base, "train.grid_every=0", "head=none"], "train_and_evaluate n=256")
    assert key != result_key("shapes", base, "train_and_evaluate n=512")
    assert key != result_key("shapes", [*base, "train.lr=1e-3"], "train_and_evaluate n=256")
    assert key != result_key("shapes", [*base, "sample.cfg_interval=[0.28,5.42]"], "train_and_evaluate n=256")
    # evaluated with another n: nothing to reuse, every arm trains
    trained.clear()
    head(Options(tmp_path / "n512", seeds=1, steps=6000, n=512, scale="recipe", reuse=(fvc,)))
    assert len(trained) == len(HEAD_ARMS)


def test_the_loss_plot_draws_the_seeds_with_curves_and_says_how_many(tmp_path, monkeypatch):
    """A record rebuilt from a committed table's per-seed summary (no curve) is counted, not drawn."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.runner import ResultLog, arm_config

    arms = {"a": ("shapes", ["train.steps=10"]), "b": ("shapes", ["train.steps=10"])}
    log = ResultLog(tmp_path / "log.jsonl")
    for arm, seed, curve in (("a", 0, [0.5, 0.25]), ("a", 1, None), ("b", 0, [0.4, 0.2]), ("b", 1, [0.6, 0.2])):
        log.add({"arm": arm, "seed": seed, "config": arm_config(*arms[arm], seed)[1],
                 **({"curve_steps": [5, 10], "curve": curve} if curve else {})})
    drawn = []
    monkeypatch.setattr(reproduce, "plot_band", lambda ax, x, curves, label: drawn.append((curves, label)))
    reproduce.plot_loss_bands(tmp_path / "loss.png", log, arms, 2, "title")
    assert drawn == [([[0.5, 0.25]], "a (curves of 1 of 2 seeds)"), ([[0.4, 0.2], [0.6, 0.2]], "b (2 seeds)")]
    assert (tmp_path / "loss.png").exists()


def test_the_experiment_registry_says_which_options_each_experiment_takes(tmp_path):
    """launch/reproduce.py is a thin entry point over EXPERIMENTS: an option an experiment does not take is an error
    naming the experiments that do; what is not given comes from the experiment's defaults."""
    from gmmcond.errors import ConfigError
    from gmmcond.experiments import editing, reproduce  # noqa: F401  (fill the registry)
    from gmmcond.experiments.runner import EXPERIMENTS

    assert {"density", "ngmg-vs-bce", "head", "features-vs-classes", "distribution", "precision", "combinations",
            "editing"} <= set(EXPERIMENTS)
    opts = EXPERIMENTS["head"].options({"out": tmp_path, "seeds": 5, "steps": None, "arms": ("no head",)})
    assert (opts.seeds, opts.steps, opts.n, opts.scale, opts.arms) == (5, 1000, 512, "v1", ("no head",))
    with pytest.raises(ConfigError, match="--arms applies to head, distribution, combinations, not precision"):
        EXPERIMENTS["precision"].options({"out": tmp_path, "arms": ("fp32",)})
    with pytest.raises(ConfigError, match="--run applies to editing, not density"):
        EXPERIMENTS["density"].options({"out": tmp_path, "run": tmp_path})
    with pytest.raises(ConfigError, match="--cfg-scale applies to editing, not head"):
        EXPERIMENTS["head"].options({"out": tmp_path, "cfg_scale": 2.0})


def test_a_tabulation_ends_with_the_experiments_table_not_its_json(tmp_path):
    """What reproduce.py prints when it tabulates: the markdown table the report would show (the per-seed records
    and curves stay in the JSON it writes)."""
    from entry import run_captured

    done = run_captured("reproduce", "distribution", "--no-train", "--out", str(tmp_path), "--seeds", "2")
    assert done.returncode == 0, done.stderr
    assert "(no arm has a finished seed yet)" in done.stdout and "{" not in done.stdout
    assert (tmp_path / "distribution.json").exists()


def test_a_result_records_the_precision_its_run_trained_at(tiny_run, tmp_path, monkeypatch):
    """Seeds of one arm may train on hosts that resolve ``precision: auto`` differently (bf16 only where the CPU
    computes it natively): the record says which (``train_precision``), from the run's resolved config, beside the
    evaluation's ``precision`` (PRDC's, a different number that must not overwrite it)."""
    from gmmcond.eval import evaluate
    from gmmcond.experiments.reproduce import train_and_evaluate, trained_precision
    from gmmcond.modeling.precision import resolve_precision

    trained = resolve_precision("auto", "cpu").name
    assert trained_precision(tiny_run) == trained
    assert trained_precision(tmp_path / "no_such_run") is None
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, overrides, size, **kw: real(
        run, {**overrides, "steps": 2}, evaluate.EvalSize(n=8, sets=0, memorisation=0), **kw))
    record = train_and_evaluate("shapes_tiny", [], tiny_run, n=8)  # a finished run: evaluated, not trained again
    assert record["train_precision"] == trained and isinstance(record["precision"], float)


def test_records_logged_before_a_key_was_take_it_from_their_run_folder(tiny_run, tmp_path):
    """Precision, median step time and the head's share of the objective come from the run folder, for records
    written before they carried them; a folder that is gone adds nothing, and what a record has stays."""
    from gmmcond.experiments.reproduce import fill_from_run_folders, from_run_folder
    from gmmcond.io import ResultLog, median_sec_per_step, read_metrics
    from gmmcond.modeling.precision import resolve_precision

    told = from_run_folder(tiny_run)
    rows = [r for r in read_metrics(tiny_run / "metrics.jsonl") if "diffusion" in r]
    assert told == {"train_precision": resolve_precision("auto", "cpu").name,
                    "sec_per_step_median": median_sec_per_step(rows)}  # no head: no share
    log = ResultLog(tmp_path / "log.jsonl")
    log.add({"key": "a", "run": str(tiny_run), "sec_per_step_median": 9.0})
    log.add({"key": "b", "run": str(tmp_path / "gone")})
    fill_from_run_folders(log)
    assert log.records[0] == {"key": "a", "run": str(tiny_run), "sec_per_step_median": 9.0,
                              "train_precision": told["train_precision"]}
    assert log.records[1] == {"key": "b", "run": str(tmp_path / "gone")}


def test_a_logged_result_is_computed_once_and_read_back(tmp_path):
    """ResultLog.once, the resumable unit of every experiment: a key already logged is read back, not computed."""
    from gmmcond.io import ResultLog

    calls = []
    log = ResultLog(tmp_path / "log.jsonl")
    first = log.once({"arm": "a", "seed": 0}, lambda: calls.append(1) or {"x": 1.5})
    again = ResultLog(tmp_path / "log.jsonl").once({"arm": "a", "seed": 0}, lambda: calls.append(2) or {"x": 9.0})
    other = log.once({"arm": "a", "seed": 1}, lambda: calls.append(3) or {"x": 2.5})
    assert calls == [1, 3] and first == again == {"arm": "a", "seed": 0, "x": 1.5} and other["x"] == 2.5


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


def test_recipe_table_gives_mean_and_sample_std_over_runs(tmp_path):
    import json
    import statistics

    from gmmcond.experiments.report import recipe_table

    runs = []
    for k, acc in enumerate((0.90, 0.94)):
        run = tmp_path / f"seed{k}"
        run.mkdir()
        ev = {"attr_accuracy": acc, "all_attributes_correct": 0.5, "defect_rate": 0.1 * (k + 1),
              "per_attribute": {"circle": 0.7, "square": 0.8 + 0.1 * k, "triangle": 0.9},
              **{m: {"value": 0.8, "real_reference": 0.99} for m in ("fd", "kid", "recall", "coverage", "precision")}}
        (run / "eval.json").write_text(json.dumps(ev))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "sec_per_step": t}) + "\n"
                                                   for s, t in ((10, 9.0), (20, 0.1 + k), (30, 0.3 + k))))
        runs.append(run)
    table = recipe_table(runs)
    row = next(line for line in table.splitlines() if line.startswith("| default recipe"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    sd = statistics.stdev
    assert cells[1] == "2"
    assert cells[2] == f"{0.7:.3f} +- {sd([0.2, 1.2]):.3f}"  # median step time without the first (compiling) interval
    assert cells[3] == f"{0.92:.4f} +- {sd([0.90, 0.94]):.4f}"
    shape = [statistics.fmean([0.7, 0.8, 0.9]), statistics.fmean([0.7, 0.9, 0.9])]  # mean of circle, square, triangle
    assert cells[4] == f"{statistics.fmean(shape):.3f} +- {sd(shape):.3f}"
    assert cells[5] == f"{0.15:.3f} +- {sd([0.1, 0.2]):.3f}"
    assert "| real vs real (reference) |" in table


def test_paper_experiments_keep_the_scale_they_were_measured_at():
    from gmmcond.config import load_config
    from gmmcond.experiments.reproduce import EXPERIMENT_SCALE

    cfg = load_config("shapes", list(EXPERIMENT_SCALE))
    assert (cfg["train"]["steps"], cfg["train"]["compile"], cfg["model"]["self_attn_depths"]) == (2000, False, [False] * 3)
    assert cfg["denoiser"]["loss"] == "karras" and load_config("shapes")["denoiser"]["loss"] == "soft_min_snr"
    assert load_config("shapes", [*EXPERIMENT_SCALE, "train.steps=1000"])["train"]["steps"] == 1000  # an arm's own wins


def test_an_experiment_scale_leads_each_arm_and_its_result_key(tmp_path):
    from gmmcond.config import load_config
    from gmmcond.experiments.reproduce import EXPERIMENT_SCALE, SCALES, combination_arms
    from gmmcond.experiments.runner import arm_config

    recipe, overrides = combination_arms(500)["features joint"]
    full, key = arm_config(recipe, overrides, 1)
    # v1 keys read exactly as before scales existed: results logged then still count
    assert key == "shapes: " + " ".join([*EXPERIMENT_SCALE, *overrides[len(EXPERIMENT_SCALE):], "train.seed=1",
                                          "conditioner.seed=1"])
    assert load_config(recipe, full)["train"]["steps"] == 500
    recipe, overrides = combination_arms(500, "recipe")["features joint"]
    cfg = load_config(recipe, arm_config(recipe, overrides, 0)[0])
    default = load_config("shapes")
    assert SCALES["recipe"] == () and cfg["denoiser"]["loss"] == default["denoiser"]["loss"]
    # the recipe's sigma_data and guidance changed after these experiments were logged: their arms train and sample
    # at the logged 0.5 and 1.5, and neither their keys nor their run folders name them
    full, key = arm_config(recipe, overrides, 0)
    assert default["denoiser"]["sigma_data"] == "data" and cfg["denoiser"]["sigma_data"] == 0.5
    assert default["sample"]["cfg_scale"] == 2.0 and cfg["sample"]["cfg_scale"] == 1.5
    assert full[:2] == ["denoiser.sigma_data=0.5", "sample.cfg_scale=1.5"] and "sigma_data" not in key
    assert "cfg_scale" not in key
    own = arm_config("shapes", ["denoiser.sigma_data=data"], 0)[0]  # an arm that sets it itself keeps its value
    assert load_config("shapes", own)["denoiser"]["sigma_data"] == "data"
    assert cfg["model"]["self_attn_depths"] == default["model"]["self_attn_depths"] and cfg["train"]["steps"] == 500
    with pytest.raises(ConfigError, match="unknown experiment scale 'v2'; the scales are: v1, recipe, paper"):
        combination_arms(500, "v2")


def test_the_report_names_each_experiments_scale_steps_and_seeds(tmp_path):
    import json

    from gmmcond.experiments.report import report

    stat = {"mean": 0.5, "std": 0.1, "n": 2}
    result = {"steps": 1500, "seeds": 2, "scale": "recipe",
              "arms": {"fixed value (attrs)": {"all_attributes_correct": stat, "defect_rate": stat}}}
    (tmp_path / "distribution.json").write_text(json.dumps(result))
    text = report(tmp_path)
    assert "### distribution (`python launch/reproduce.py distribution --scale recipe --steps 1500 --seeds 2`)" in text
    assert "| fixed value (attrs) | 2 | 0.500 +- 0.100 | 0.500 +- 0.100 |" in text


def test_the_report_pairs_each_arm_with_the_first_by_seed():
    from gmmcond.experiments.report import paired_table

    def arm(values):  # per-seed losses, seeds 0..k-1
        return {"per_seed": [{"seed": s, "last100": v} for s, v in enumerate(values)]}

    # seed 2 of "head" has no partner in "no head" and is left out; differences -0.002, -0.001: mean -0.0015,
    # std (n - 1) 0.000707...
    result = {"arms": {"no head": arm([0.010, 0.020]), "head": arm([0.008, 0.019, 0.5]), "other": {"per_seed": []}}}
    text = paired_table(result)
    assert "each arm minus 'no head'" in text
    assert "| head | 2 | -0.0015 +- 0.0007 (0 of 2 > 0) |" in text
    assert "| other |" not in text  # no seed in common: no row
    assert paired_table({"arms": {"no head": arm([0.01])}}) == ""


def test_the_heads_share_of_the_objective_is_read_from_the_logged_losses():
    from gmmcond.experiments.reproduce import head_share

    rows = [{"step": 10, "loss": 0.010, "diffusion": 0.008, "head": 0.02},  # 0.1 x 0.02 = 0.002 of 0.010: 0.2
            {"step": 20, "loss": 0.005, "diffusion": 0.004, "head": 0.01},  # 0.001 of 0.005: 0.2
            {"step": 30, "loss": 0.008, "diffusion": 0.002, "head": 0.06}]  # 0.006 of 0.008: 0.75
    assert abs(head_share(rows) - (0.2 + 0.2 + 0.75) / 3) < 1e-12
    assert head_share([{"step": 10, "loss": 0.01, "diffusion": 0.01}]) is None  # no head logged


def test_a_runs_steady_minutes_leave_out_the_time_other_work_took():
    from gmmcond.experiments.benchmarks import steady_minutes, training_minutes

    metrics = [{"step": 10, "sec_per_step": 1.0}, {"step": 20, "sec_per_step": 7.0}, {"step": 30, "sec_per_step": 1.0}]
    assert steady_minutes(metrics) == 30 * 1.0 / 60 and training_minutes(metrics)[30] == 90 / 60


def test_the_median_step_time_leaves_out_what_it_is_told_to():
    from gmmcond.io import median_sec_per_step

    times = [9.0, 4.0, 1.0, 2.0, 3.0]
    rows = [{"step": 0, "loss": 1.0}] + [{"step": 10 * i, "sec_per_step": t} for i, t in enumerate(times, 1)]
    assert median_sec_per_step(rows, "none") == 3.0  # of 9, 4, 1, 2, 3; the row without a time is not one
    assert median_sec_per_step(rows) == 2.5  # the first interval (compiling) left out: of 4, 1, 2, 3
    assert median_sec_per_step(rows, "half") == 2.0  # the second half: of 1, 2, 3
    with pytest.raises(ValueError, match="no sec_per_step"):
        median_sec_per_step([{"step": 0, "loss": 1.0}])


def test_a_head_weight_for_a_share_gives_that_share_when_the_losses_stay():
    from gmmcond.experiments.reproduce import share_weight

    head, diffusion = 0.03, 0.004  # a share of 0.1 x 0.03 / (0.003 + 0.004) = 3/7 at weight 0.1
    for target in (0.02, 0.10, 0.5):
        w = share_weight(0.1, 0.003 / 0.007, target)
        assert abs(w * head / (w * head + diffusion) - target) < 0.05 * target  # w to two significant digits
    assert share_weight(0.1, 0.25, 0.25) == 0.1


def test_the_head_experiment_calibrates_each_loss_on_seed_0_then_trains_every_seed_at_that_weight(tmp_path,
                                                                                                monkeypatch):
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.runner import Options

    trained = []

    def fake(recipe, full, run, *, n):  # a head's share of 0.2 (NGMG) or 0.5 (BCE) at the shipped weight 0.1
        trained.append(tuple(full))
        share = 0.5 if "head.loss=bce" in full else 0.2 if "head=bottleneck_attrs" in full else None
        steps = list(range(10, 1010, 10))
        final = 0.010 if share is None else 0.012  # the no-head arm ends lower, flat from step 800
        curve = [final + 0.05 * max(0, 800 - s) / 1000 for s in steps]
        return {"last100": final, "steps": 1000, "curve_steps": steps, "curve": curve,
                **({} if share is None else {"head_share": share})}

    monkeypatch.setattr(reproduce, "train_and_evaluate", fake)
    monkeypatch.setattr(reproduce, "plot_loss_bands", lambda *a, **k: None)
    result = reproduce.head(Options(tmp_path, seeds=2, steps=1000, n=8, scale="recipe"))
    assert set(result["arms"]) == {"no head", "head ngmg surplus", "head bce", "head ngmg surplus, share 2%",
                                   "head ngmg surplus, share 10%", "head bce, share 2%", "head bce, share 10%"}
    assert len(trained) == 7 * 2  # each arm and seed once: the calibration runs are the shipped arms' seed 0
    weights = [o for t in trained for o in t if o.startswith("head.weight=")]
    # NGMG: 0.1 x odds(0.02) / odds(0.2) = 0.0082 and x odds(0.1) / odds(0.2) = 0.044; BCE from odds(0.5) = 1
    assert sorted(set(weights)) == ["head.weight=0.002", "head.weight=0.0082", "head.weight=0.011", "head.weight=0.044"]
    assert all(weights.count(w) == 2 for w in weights)  # fixed for both seeds
    assert result["calibrated_weights"] == {"head ngmg surplus, share 2%": 0.0082, "head ngmg surplus, share 10%": 0.044,
                                            "head bce, share 2%": 0.002, "head bce, share 10%": 0.011}
    no_head = result["arms"]["no head"]
    expected = sum(0.010 + 0.05 * max(0, 800 - s) / 1000 for s in range(160, 260, 10)) / 10  # steps 151..250
    assert no_head["loss_at_25pct"]["mean"] == pytest.approx(expected, rel=1e-12)
    assert no_head["reaches_base_final"]["mean"] == 1.0 and no_head["steps_to_base_final"]["mean"] == 890
    assert result["arms"]["head bce"]["reaches_base_final"]["mean"] == 0.0
    assert "steps_to_base_final" not in result["arms"]["head bce"]


def test_the_head_experiment_tabulates_seeds_whose_records_kept_no_curve(tmp_path, monkeypatch):
    """A record rebuilt from a table's per-seed row (or reused from such a log) keeps its numbers, not its loss
    curve: convergence leaves it out and the rest of the table stands."""
    from gmmcond.experiments import reproduce
    from gmmcond.experiments.runner import Options

    def fake(recipe, full, run, *, n):
        steps = list(range(10, 1010, 10))
        rec = {"last100": 0.01, "steps": 1000, "curve_steps": steps, "curve": [0.01] * len(steps)}
        if "head=none" in full and "train.seed=1" in full:
            del rec["curve_steps"], rec["curve"]
        return rec

    monkeypatch.setattr(reproduce, "train_and_evaluate", fake)
    monkeypatch.setattr(reproduce, "plot_loss_bands", lambda *a, **k: None)
    result = reproduce.head(Options(tmp_path, seeds=2, steps=1000, n=8, scale="recipe", arms=("no head",)))
    no_head = result["arms"]["no head"]
    assert no_head["last100"]["n"] == 2 and "loss_at_25pct" not in no_head  # not every seed has it: no summary
    assert [("loss_at_25pct" in r) for r in no_head["per_seed"]] == [True, False]


def test_the_open_table_reports_each_target_met_or_missed_from_the_records():
    from gmmcond.experiments.report import open_table
    from gmmcond.experiments.runner import summarise_records

    def rec(seed, **kw):
        return {"seed": seed, "steps": 1, **kw}

    data = [rec(s, conformity_seen=c, conformity_held_out=0.5, free_error_seen=e, free_floor_seen=0.04,
                free_error_held_out=0.2, free_floor_held_out=0.05, negation_conformity=0.97,
                single_negation_error=0.05, single_negation_floor=0.06) for s, c, e in ((0, 0.85, 0.05), (1, 0.80, 0.07))]
    joint = [rec(s, conformity_seen=c, conformity_held_out=0.4) for s, c in ((0, 0.86, ), (1, 0.84))]
    result = {"arms": {"features joint": summarise_records(joint), "features, open from data": summarise_records(data)}}
    table = open_table(result)
    assert "| features, open from data | plain model, open=data | 2 |" in table
    # (0.05 / 0.04 + 0.07 / 0.04) / 2 = 1.5: met; held-out 0.2 / 0.05 = 4: missed by 2.5x
    assert "features, open from data, seen: free-attribute error / real floor 1.50 +- 0.35 (target <= 1.5): met" in table
    assert "held-out: free-attribute error / real floor 4.00 +- 0.00 (target <= 1.5): missed by 2.50x" in table
    assert "negation conformity 0.970 +- 0.000 (target >= 0.95): met" in table
    assert "colour-share error minus its real floor -0.010 +- 0.000 (target <= 0): met" in table
    # paired by seed: (0.85 - 0.86, 0.80 - 0.84) -> -0.025 +- 0.021: missed by 0.005
    assert "minus features joint, seen conformity paired by seed (2 seeds): -0.025 +- 0.021 (target >= -0.02): missed by 0.005" in table
    assert open_table({"arms": {"features joint": summarise_records(joint)}}) == ""  # nothing open: no table


def test_the_sampler_budget_counts_model_calls_and_evaluates_each_setting_once(tiny_run, monkeypatch):
    import k_diffusion as K

    from gmmcond.eval import evaluate
    from gmmcond.experiments import benchmarks
    from gmmcond.sampling.settings import SamplingSettings

    assert benchmarks.model_calls(SamplingSettings("dpmpp_2m", 15, 1.5)) == 30
    assert benchmarks.model_calls(SamplingSettings({"type": "x0_reproject", "renoise": 0.5}, 100, 1.5)) == 200
    assert benchmarks.model_calls(SamplingSettings("heun", 10, 1.0)) == 20
    # guided only where 0.28 < sigma <= 5.42: of k-diffusion's 100 Karras sigmas from 80 to 0.01 (rho 7), 32 steps
    sigmas = K.sampling.get_sigmas_karras(100, 0.01, 80.0, 7.0)
    interval = SamplingSettings({"type": "x0_reproject", "renoise": 0.5}, 100, 2.5, cfg_interval=(0.28, 5.42))
    assert benchmarks.model_calls(interval, sigmas) == 100 + int(((sigmas[:-1] > 0.28) & (sigmas[:-1] <= 5.42)).sum()) == 132
    with pytest.raises(ValueError, match="sampling sigmas"):
        benchmarks.model_calls(interval)
    calls = []
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, overrides, size, **kw: calls.append(overrides) or real(
        run, {**overrides, "steps": 2}, evaluate.EvalSize(n=8, sets=0, memorisation=0), **kw))
    names = ["dpmpp_2m, 15 steps, CFG 1.5"]
    first = benchmarks.sampler_budget([tiny_run], names, n=8, log=lambda *_: None)
    again = benchmarks.sampler_budget([tiny_run], names, n=8, log=lambda *_: None)  # read back, not evaluated again
    row = first["settings"][names[0]]
    assert len(calls) == 1 and again == first and row["model_calls"] == 30
    assert 0 <= row["all_attributes_correct"]["mean"] <= 1 and row["eval_seconds"]["mean"] > 0
    # a setting's name in tables logged before the recipe's guidance changed still selects it
    former = benchmarks.sampler_budget([tiny_run], ["x0_reproject 0.5, 100 steps, CFG 1.5 (recipe)"], n=8,
                                       log=lambda *_: None)
    assert list(former["settings"]) == ["x0_reproject 0.5, 100 steps, CFG 1.5"] and calls[-1]["cfg_scale"] == 1.5


def test_the_setting_recipes_and_peer_score_with_is_the_default_recipes_sampling():
    from gmmcond.config import load_config
    from gmmcond.experiments.benchmarks import FORMER_NAMES, RECIPE_SETTING, SAMPLER_BUDGET

    sample = load_config("shapes")["sample"]
    assert SAMPLER_BUDGET[RECIPE_SETTING] == {k: sample[k] for k in ("sampler", "steps", "cfg_scale")}
    assert set(FORMER_NAMES.values()) <= set(SAMPLER_BUDGET) and not set(FORMER_NAMES) & set(SAMPLER_BUDGET)


def test_recipes_compared_groups_runs_by_recipe_and_pairs_them_by_training_seed(tiny_cfg, tmp_path, monkeypatch):
    import yaml

    from gmmcond.engine.trainer import train
    from gmmcond.eval import evaluate
    from gmmcond.experiments import benchmarks
    from gmmcond.experiments.document import sampler_budget_table

    a, b = tmp_path / "shapes_tiny_s1", tmp_path / "other_s1"
    train(tiny_cfg("name=shapes_tiny_s1", "train.seed=1"), a)
    train(tiny_cfg("name=other_s1", "train.seed=1", "train.lr=5e-4"), b)
    c = tmp_path / "shapes_tiny_s0"  # seed 0 of a's recipe (its config only: grouping reads nothing else)
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    c.mkdir()
    # trained on one thread and keeping post-hoc EMA tracks: the same recipe
    (c / "config.yaml").write_text(yaml.safe_dump({**cfg, "name": "shapes_tiny_s0", "train": {
        **cfg["train"], "seed": 0, "cpu_threads": 1, "posthoc_ema": [0.1]}}))
    groups = benchmarks.recipe_groups([a, b, c])
    assert list(groups) == ["shapes_tiny", "other"] and [run for run, _ in groups["shapes_tiny"]] == [a, c]
    d = tmp_path / "tiny_lr_s0"  # a recipe set by overrides keeps its config name: named by its run folder
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "lr": 2e-4}}))
    assert list(benchmarks.recipe_groups([a, d])) == ["shapes_tiny", "tiny_lr"]
    budgeted = []  # two seeds of one wall-clock budget, their steps fitted to different speeds: one recipe
    for seed, steps in enumerate((4479, 3938)):
        run = tmp_path / f"budget_s{seed}"
        run.mkdir()
        history = [{"step": 21, "fitted": {"train.steps": {"from": 20000, "to": steps}, "train.minutes": 10.0}}]
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "history": history, "train": {
            **cfg["train"], "seed": seed, "minutes": 10.0, "steps": steps}}))
        budgeted.append(run)
    assert list(benchmarks.recipe_groups(budgeted)) == ["budget"]
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, overrides, size, **kw: real(
        run, {**overrides, "steps": 2}, evaluate.EvalSize(n=8, sets=1, per_set=8, memorisation=0), **kw))
    result = benchmarks.recipes_compared([a, b], n=8, log=lambda *_: None)
    assert list(result["settings"]) == ["shapes_tiny", "other"] and result["compared"] == "recipe"
    other = result["settings"]["other"]
    assert [r["seed"] for r in other["per_seed"]] == [1] and other["model_calls"] == 200  # its training seed
    assert [r["train_steps"] for r in other["per_seed"]] == [3] and other["minutes"]["mean"] > 0
    table = sampler_budget_table(result)
    assert "| recipe | model calls a sample | runs |" in table
    assert "paired by training seed, each recipe minus 'shapes_tiny'" in table
    assert "(0 of 1 > 0)" in table or "(1 of 1 > 0)" in table  # seed 1 of each, paired


def test_the_recipes_table_on_data_without_per_set_metrics_shows_recall_and_coverage_of_the_whole_set():
    """Real data (digits, a folder) has no renderer to redraw an attribute set: no per-set numbers, so the table
    gives the whole set's recall and coverage against the real reference and no spread."""
    from gmmcond.experiments.document import sampler_budget_table
    from gmmcond.experiments.runner import summarise_records

    def runs(conf, recall, coverage):
        return [{"seed": s, "all_attributes_correct": c, "defect_rate": 0.1, "recall": r, "recall_real_reference": 0.8,
                 "coverage": v, "coverage_real_reference": 0.5, "eval_seconds": 10.0}
                for s, (c, r, v) in enumerate(zip(conf, recall, coverage))]

    result = {"compared": "recipe", "settings": {
        "digits": {"model_calls": 200, **summarise_records(runs([0.5, 0.7], [0.4, 0.4], [0.5, 0.5]))},
        "digits_new": {"model_calls": 200, **summarise_records(runs([0.6, 0.9], [0.8, 0.8], [0.25, 0.25]))}}}
    table = sampler_budget_table(result).splitlines()
    assert table[0] == ("| recipe | model calls a sample | runs | conformity | defects | recall / real | coverage / real | "
                        "spread | evaluation seconds |")
    assert table[2] == "| digits | 200 | 2 | 0.600 +- 0.141 | 0.100 +- 0.000 | 0.50x | 1.00x | - | 10 +- 0 |"
    assert table[3].startswith("| digits_new | 200 | 2 | 0.750 +- 0.212 | 0.100 +- 0.000 | 1.00x | 0.50x | - |")
    assert table[-3:] == ["| recipe | conformity | defects | coverage |", "|---|---|---|---|",
                          "| digits_new | +0.150 +- 0.071 (2 of 2 > 0) | +0.000 +- 0.000 (0 of 2 > 0) | "
                          "-0.250 +- 0.000 (0 of 2 > 0) |"]


def test_processes_working_through_one_arm_list_split_it_by_the_run_folders_claims(tmp_path):
    """reproduce.py --jobs: a unit whose run folder another process has claimed is left to it, a result another
    process logged meanwhile is read back instead of computed, and a claim ends with its holder's file."""
    from gmmcond.experiments.runner import Options, arm_config, run_arms, run_folder
    from gmmcond.io import Claim, ResultLog

    arms = {"a": ("shapes", ["train.steps=5"]), "b": ("shapes", ["train.steps=7"])}
    opts, said = Options(tmp_path, seeds=2, progress=lambda m: said.append(m)), []
    run = lambda arm, seed: run_folder(opts.runs, f"x_{arm}_seed{seed}", arm_config(*arms[arm], seed)[1])  # noqa: E731
    other = Claim(run("a", 0))  # another worker is training a, seed 0
    assert other.acquire() and not Claim(run("a", 0)).acquire()
    evaluated = []

    def evaluate(arm, seed, recipe, full, folder, n):
        evaluated.append((arm, seed))
        if (arm, seed) == ("b", 0):  # meanwhile the other worker logs a, seed 1
            ResultLog(tmp_path / "log.jsonl").add({"arm": "a", "seed": 1, "config": arm_config(*arms["a"], 1)[1], "x": 2.0})
        return {"x": 1.0}

    log = ResultLog(tmp_path / "log.jsonl")
    run_arms(arms, log, opts, "x", evaluate=evaluate)
    assert evaluated == [("b", 0), ("b", 1)] and any("another process" in m and "a seed 0" in m for m in said)
    assert sorted((r["arm"], r["seed"]) for r in ResultLog(tmp_path / "log.jsonl").records) == [("a", 1), ("b", 0), ("b", 1)]
    other.release()  # the other worker died before logging: a rerun does the unit
    run_arms(arms, ResultLog(tmp_path / "log.jsonl"), opts, "x", evaluate=evaluate)
    assert evaluated[2:] == [("a", 0)]


def test_workers_run_on_disjoint_cores_return_their_status_and_get_the_signals_sent_to_their_parent(tmp_path):
    import os
    import signal
    import sys
    import threading

    from gmmcond.experiments.runner import core_groups, run_workers

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    with pytest.raises(ConfigError, match=f"from 1 to {len(cores)}"):
        core_groups(len(cores) + 1)
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    show = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    assert run_workers([sys.executable, "-c", show], 2, logs, progress=lambda m: None) == [0, 0]
    seen = [eval(log.read_text().split("] ")[0] + "]") for log in logs]
    assert sorted(seen[0] + seen[1]) == cores and not set(seen[0]) & set(seen[1])
    assert [log.read_text().split()[-1] for log in logs] == [str(len(s)) for s in seen]
    # SIGTERM to the parent reaches every worker (here each answers 75, as a trainer that checkpointed does)
    wait = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: (print('got', a[0], flush=True), "
            "sys.exit(75)))\nprint('ready', flush=True)\ntime.sleep(60)")
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert run_workers([sys.executable, "-c", wait], 2, logs, progress=lambda m: None) == [75, 75]
    assert all(f"got {int(signal.SIGTERM)}" in log.read_text() for log in logs)


def test_the_result_keys_logged_before_a_setting_was_added_still_match():
    """A setting added later at the value that does what runs did before it is left out of the key: the committed
    Fig. 9 log (logged before ``sample.cfg_interval`` existed) still finds its runs, and the arms it reuses."""
    import shlex

    from entry import ROOT
    from gmmcond.experiments.reproduce import train_eval_protocol
    from gmmcond.experiments.runner import result_key
    from gmmcond.io import ResultLog

    records = ResultLog(ROOT / "launch/figures/results/head_paper.jsonl").records
    assert len(records) >= 4
    for r in records:
        recipe, rest = r["config"].split(": ", 1)
        assert result_key(recipe, shlex.split(rest), train_eval_protocol(256)) == r["result_key"], r["arm"]  # n 256
