import random

import pytest
import torch

from gmmcond.data import shapes as S
from gmmcond.data.shapes import check_image
from gmmcond.data.shapes import ShapesDataset
from gmmcond.errors import ConfigError


def render(params, size=16):
    return S.to_tensor(S.render(params, size))


def test_real_heldout_shapes_are_rarely_flagged():
    data = ShapesDataset(size=16, split="test")
    flags = [check_image(*data[i][:2]).defect for i in range(500)]
    assert sum(flags) / len(flags) < 0.01


def broken_images(n=20):
    rng = random.Random(0)
    out = []
    for i in range(n):
        p = S.draw_params(rng)
        attrs = torch.from_numpy(p.attrs())
        blank = torch.tensor(S.BACKGROUNDS[p.dark_bg], dtype=torch.float32).div(127.5).sub(1)[:, None, None].expand(3, 16, 16)
        out.append(("blank", blank.clone(), attrs))
        a = render(p)
        bg = blank.clone()
        first = S.ShapeParams(p.shape, p.colour, False, True, True, p.dark_bg, p.outline, 0.3, 0.3, S.RADIUS[False])
        second = S.ShapeParams(p.shape, p.colour, False, False, False, p.dark_bg, p.outline, 0.7, 0.7, S.RADIUS[False])
        b, c = render(first), render(second)
        two = torch.where((c - bg).abs().sum(0, keepdim=True) > 0.3, c, b)  # two small shapes, opposite corners
        small = attrs.clone()
        small[list(S.ATTR_NAMES).index("large")] = 0
        out.append(("two objects", two, small))
        half = a.clone()
        centre = round(p.cx * 16)
        half[:, :, centre:] = bg[:, :, centre:]  # the right half of the shape is missing
        out.append(("half drawn", half, attrs))
        noise = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1
        out.append(("pure noise", noise, attrs))
    return out


def test_blank_two_object_half_drawn_and_noise_images_are_all_flagged():
    missed = [(kind, check_image(img, attrs).reason) for kind, img, attrs in broken_images()
              if not check_image(img, attrs).defect]
    assert missed == []


def test_class_labellings_fix_what_their_labels_say_and_index_every_combination():
    classes, combos = ShapesDataset(label_mode="classes"), ShapesDataset(label_mode="combinations")
    assert classes.known_features == ["circle", "square", "triangle", "red", "green", "blue"]
    assert combos.known_features == list(S.ATTR_NAMES) and len(combos.attr_names) == 288 == len(set(combos.attr_names))
    features = ShapesDataset()
    for i in range(50):  # the combination named by the one-hot label is exactly the item's feature row
        name = combos.attr_names[int(combos[i][1].argmax())]
        on = [S.ATTR_NAMES[k] for k in range(11) if features[i][1][k] > 0.5]
        assert name.split("+") == on


def test_evaluate_run_on_user_data_uses_confidence_and_nearest_neighbours(tiny_cfg, tmp_path):
    import numpy as np
    from PIL import Image

    from gmmcond.engine.trainer import train
    from gmmcond.eval.evaluate import EvalSize, evaluate_run
    from gmmcond.eval.evaluator import save_evaluator, train_evaluator
    from gmmcond.registry import DATASETS

    data = tmp_path / "data"
    data.mkdir()
    rows = ["file,warm,cold,big"]
    for i in range(24):
        warm = i % 2
        colour = (200, 60, 40) if warm else (40, 60, 200)
        image = np.full((16, 16, 3), 220 + i, np.uint8)  # every image distinct
        r, c = (6 if i % 3 == 0 else 3), 6 + i % 5
        image[c - r + 2:c + r, c - r + 2:c + r] = colour
        Image.fromarray(image).save(data / f"{i}.png")
        rows.append(f"{i}.png,{warm},{1 - warm},{int(r == 6)}")
    (data / "attrs.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_cfg(f"dataset={{type: imagefolder_attrs, root: {data}, size: 16, groups: [[warm, cold]], holdout: 0.5}}",
                   "sample.grid_rows=[]", "train.batch_size=4")
    train(cfg, tmp_path / "run")
    model, scores = train_evaluator(cfg["dataset"], steps=30, progress=False)
    save_evaluator(tmp_path / "ev.safetensors", model, cfg["dataset"], ["warm", "cold", "big"], scores)
    test_files = DATASETS.build(dict(cfg["dataset"], split="test")).files
    train_files = DATASETS.build(cfg["dataset"]).files
    assert not set(test_files) & set(train_files) and len(test_files) + len(train_files) == 24
    result = evaluate_run(tmp_path / "run", {"steps": 3}, EvalSize(n=6), progress=False, evaluator=tmp_path / "ev.safetensors")
    assert set(result["per_attribute"]) == {"warm", "cold", "big"}
    assert 0 <= result["defect_rate"] <= 1 and result["reference"].startswith("other held-out images with A's attribute rows")
    for key in ("fd", "kid", "precision", "recall", "density", "coverage"):
        assert set(result[key]) == {"value", "real_reference"}
    assert 0 <= result["attr_accuracy"] <= 1 and "nuisance" not in result  # no renderer, no nuisances
    assert (tmp_path / "run" / "eval.json").exists() and (tmp_path / "run" / "eval_worst.png").exists()
    again = evaluate_run(tmp_path / "run", {"steps": 3}, EvalSize(n=6), progress=False, evaluator=tmp_path / "ev.safetensors",
                         write=False)
    assert again == result  # the same run, evaluator and seed: the same numbers


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
    assert cfg["model"]["self_attn_depths"] == default["model"]["self_attn_depths"] and cfg["train"]["steps"] == 500
    with pytest.raises(ConfigError, match="unknown experiment scale 'v2'; the scales are: v1, recipe"):
        combination_arms(500, "v2")


def test_a_collapsed_sampler_scores_perfect_conformity_but_no_per_set_coverage_or_spread(tiny_cfg, tmp_path, monkeypatch):
    """One canonical real image per attribute row (no variation at all): the headline per-set numbers must
    expose it while accuracy and conformity stay perfect."""
    from gmmcond.engine.trainer import train
    from gmmcond.eval import evaluate

    run = tmp_path / "run"
    train(tiny_cfg(), run)
    held = ShapesDataset(split="test", length=256)
    canonical = {}
    for i in range(len(held)):
        image, attrs, _ = held[i]
        canonical.setdefault(tuple(attrs.tolist()), image)
    monkeypatch.setattr(evaluate.RowSampler, "__call__",
                        lambda self, attrs, *a, **kw: torch.stack([canonical[tuple(a.tolist())] for a in attrs]))
    result = evaluate.evaluate_run(run, None, evaluate.EvalSize(n=128, sets=4, per_set=32, memorisation=0), progress=False,
                                   write=False)
    h = result["headline"]
    assert list(result)[0] == "headline" and list(h)[:2] == ["all_attributes_correct", "defect_rate"]
    assert h["all_attributes_correct"] >= 0.98 and result["attr_accuracy"] >= 0.995
    assert h["set_coverage"]["value"] <= 0.3 and h["set_coverage"]["real_reference"] >= 0.8
    assert h["set_spread_ratio"]["value"] <= 0.1 and not h["set_spread_ratio"]["in_band"]


def test_evaluator_weights_are_hashed_and_an_altered_file_is_refused(tmp_path):
    from gmmcond.errors import GmmcondError
    from gmmcond.eval.evaluator import FROZEN, load_evaluator, weights_sha256
    from gmmcond.io import read_safetensors, write_safetensors

    model, meta = load_evaluator(FROZEN)
    # the committed frozen evaluator: any retraining or replacement changes this, on purpose visibly
    assert meta["weights_sha256"] == "1481c41ca61c5033c8b17c50b35c2492989d882ba30b7829428a4a561c57ca33"
    assert weights_sha256(model.state_dict()) == meta["weights_sha256"]
    tensors, raw = read_safetensors(FROZEN, GmmcondError)
    altered = dict(tensors)
    first = sorted(altered)[0]
    altered[first] = altered[first] + 1e-3
    path = tmp_path / "altered.safetensors"
    write_safetensors(path, altered, {**raw, "weights_sha256": meta["weights_sha256"]})
    with pytest.raises(GmmcondError, match="its weights do not match the sha256 in its metadata"):
        load_evaluator(path)


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
