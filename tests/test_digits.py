"""The digits dataset: the UCI scans inside scikit-learn, written as an imagefolder_attrs folder and read through it."""
import numpy as np
import pytest
import torch

from gmmcond.data import digits as D
from gmmcond.data.attrs import parse_expr
from gmmcond.errors import DatasetError
from gmmcond.registry import DATASETS

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return D.write_digits(tmp_path_factory.mktemp("digits") / "digits")


def test_the_folder_holds_the_scans_as_scikit_learn_ships_them(folder):
    ref = sklearn_datasets.load_digits()
    data = DATASETS.build({"type": "digits", "root": str(folder), "size": 8, "split": "all"})
    assert len(data) == len(ref.target) == 1797 and data.attr_names == list(D.ATTR_NAMES)
    assert data.groups == [list(D.DIGIT_NAMES)]
    for i in (0, 1, 500, 1796):
        image, attrs, _ = data[i]
        grey = np.rint(ref.images[i] * 255 / 16) / 127.5 - 1  # the 17 grey levels, as read back in [-1, 1]
        for channel in image:  # a grey PNG reads as three equal channels
            np.testing.assert_allclose(channel.numpy(), grey, atol=1e-6)
        assert attrs[: 10].argmax().item() == ref.target[i] and attrs[: 10].sum() == 1


def test_heavy_splits_each_digit_at_its_median_ink_and_the_held_out_split_is_30_percent_of_each(folder):
    ref = sklearn_datasets.load_digits()
    ink = ref.images.reshape(len(ref.images), -1).sum(1)  # grey levels, before any mapping
    data = DATASETS.build({"type": "digits", "root": str(folder), "split": "all"})
    test = DATASETS.build({"type": "digits", "root": str(folder), "split": "test"})
    train = DATASETS.build({"type": "digits", "root": str(folder), "split": "train"})
    assert not set(test.files) & set(train.files) and len(test) + len(train) == len(data)
    heavy = data.attrs[:, -1].numpy().astype(bool)
    for d in range(10):
        members = ref.target == d
        assert ink[members & heavy].min() > ink[members & ~heavy].max()  # heavier than every light scan
        assert members.sum() // 2 - 3 <= heavy[members].sum() <= members.sum() // 2  # about half (ties stay light)
        held = sum(ref.target[int(f[:4])] == d for f in test.files)
        assert held == round(0.3 * members.sum())


def test_the_folder_is_the_same_on_every_write(folder, tmp_path):
    again = D.write_digits(tmp_path / "again")
    assert (again / "attrs.csv").read_bytes() == (folder / "attrs.csv").read_bytes()
    assert D.write_digits(again) == again  # a finished folder is left as it is


def test_a_foreign_folder_or_no_scikit_learn_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="exists without attrs.csv.*remove it or give dataset.root another folder"):
        D.write_digits(tmp_path / "mine")
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    with pytest.raises(DatasetError, match="pip install scikit-learn"):
        D.write_digits(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_digits_recipe_is_the_default_on_the_digits(folder):
    from gmmcond.config import load_config

    cfg, shapes = load_config("digits"), load_config("shapes")
    assert cfg["dataset"]["type"] == "digits"
    differ = sorted(k for k in {*cfg, *shapes} if cfg.get(k) != shapes.get(k))
    assert differ == ["dataset", "name", "sample"]
    assert {k: v for k, v in cfg["sample"].items() if k != "grid_rows"} == \
        {k: v for k, v in shapes["sample"].items() if k != "grid_rows"}
    data = DATASETS.build(dict(cfg["dataset"], root=str(folder)))
    for row in cfg["sample"]["grid_rows"]:
        parse_expr(row, list(data.attr_names), data.groups)


def test_a_run_on_the_digits_trains_and_is_scored_by_an_evaluator_of_its_own(folder, tiny_cfg, tmp_path):
    from gmmcond.engine.trainer import train
    from gmmcond.eval.evaluate import EvalSize, eval_summary, evaluate_run, evaluate_sampler, heldout
    from gmmcond.eval.evaluator import save_evaluator, train_evaluator

    cfg = tiny_cfg(f"dataset={{type: digits, root: {folder}, size: 16}}", "sample.grid_rows=[seven,heavy]",
                   "train.batch_size=4")
    train(cfg, tmp_path / "run")
    model, scores = train_evaluator(cfg["dataset"], steps=30, progress=False)
    save_evaluator(tmp_path / "ev.safetensors", model, cfg["dataset"], list(D.ATTR_NAMES), scores)
    result = evaluate_run(tmp_path / "run", {"steps": 3}, EvalSize(n=8), progress=False,
                          evaluator=tmp_path / "ev.safetensors")
    assert set(result["per_attribute"]) == set(D.ATTR_NAMES)
    assert result["reference"].startswith("other held-out images with A's attribute rows")
    assert 0 <= result["all_attributes_correct"] <= 1 and torch.isfinite(torch.tensor(result["fd"]["value"]))
    assert eval_summary(result)["all_attributes_correct_real_reference"] == result["all_attributes_correct_real_reference"]

    real_x = heldout(cfg["dataset"], 8, list(D.ATTR_NAMES)).real_x

    class RealImages:  # hands back the held-out images the rows come from: their conformity is the reference
        seed = 0

        def __call__(self, attrs, seed, desc, latents=None, progress=None):
            assert len(attrs) == len(real_x)
            return real_x

        def paired_latents(self, index):
            return None

    scored = evaluate_sampler(RealImages(), cfg["dataset"], EvalSize(n=8, memorisation=0),
                              evaluator=tmp_path / "ev.safetensors", progress=False).result
    assert scored["all_attributes_correct"] == scored["all_attributes_correct_real_reference"]
