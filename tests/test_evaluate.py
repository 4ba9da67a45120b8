import random

import pytest
import torch

from gmmcond.data import shapes as S
from gmmcond.data.shapes import check_image
from gmmcond.data.shapes import ShapesDataset
from gmmcond.engine.trainer import train


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


def test_an_evaluation_records_its_guidance_interval_and_warns_at_small_n(tiny_run):
    from gmmcond.eval.evaluate import EvalSize, evaluate_run

    result = evaluate_run(tiny_run, None, EvalSize(n=8, sets=0), progress=False, write=False)
    assert result["warnings"] and "n=8 is below 64" in result["warnings"][0]
    assert "cfg_interval" not in result  # guidance at every sigma, as before intervals existed
    limited = evaluate_run(tiny_run, {"cfg_scale": 2.0, "cfg_interval": [0.5, 5.0]}, EvalSize(n=8, sets=0),
                           progress=False, write=False)
    assert limited["cfg_interval"] == [0.5, 5.0] and limited["cfg_scale"] == 2.0


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
