"""Quality and diversity metrics against the prdc package and closed forms; the frozen evaluator."""
import numpy as np
import pytest
import torch

from gmmcond.data.shapes import ATTR_NAMES, ShapesDataset
from gmmcond.eval.evaluator import (FROZEN, EvaluatorData, config_hash, evaluator_for, heldout_scores, load_evaluator,
                                    training_config)
from gmmcond.eval.metrics import knn_radii, nuisance_fidelity, prdc, set_metrics


def points(n=200, d=8, seed=0, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_matches_the_prdc_package_on_continuous_data(k):
    import prdc as prdc_pkg  # a test dependency (pyproject's test extra): missing it fails, never skips

    real, fake = points(seed=0), points(seed=1, shift=0.3)
    ours = prdc(real, fake, k_pr=k, k_dc=k)
    theirs = prdc_pkg.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key


def test_prdc_matches_the_prdc_package_on_its_readme_example_in_float32():
    """prdc's README example (Naeem et al. 2020: two sets of draws of N(0, I) in 1000-d, float32, k = 5) at 1000 draws
    a set instead of 10k: in high dimension every pair is near the same distance, where rounding matters most."""
    import prdc as prdc_pkg

    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(1000, 1000, generator=gen), torch.randn(1000, 1000, generator=gen)
    ours = prdc(real, fake, k_pr=5, k_dc=5)
    theirs = prdc_pkg.compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-9), key


def test_knn_radius_excludes_the_point_itself():
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0]


def test_identical_sets_score_one():
    real = points()
    m = prdc(real, real.clone())
    assert m["precision"] == 1 and m["recall"] == 1 and m["coverage"] == 1
    # each real k-NN ball holds its k neighbours and the point itself: density is exactly (k + 1) / k
    assert m["density"] == pytest.approx(6 / 5, abs=1e-12)
    with_dupes = torch.cat([real[:50], real[:50]])  # ties: a duplicate sits at distance 0 and counts inside
    assert prdc(with_dupes, with_dupes.clone())["recall"] == 1


def test_a_collapsed_set_scores_low_recall_coverage_and_spread():
    real = points()
    collapsed = real[:1].expand(200, -1).clone()
    m = prdc(real, collapsed)
    assert m["recall"] < 0.05 and m["coverage"] < 0.05 and m["precision"] == 1
    fid = nuisance_fidelity(real.numpy(), collapsed.numpy(), [f"n{j}" for j in range(8)])
    assert all(v["spread_ratio"] < 1e-12 for v in fid.values())


def test_a_shifted_set_scores_low_precision_and_a_large_distance():
    real, far = points(seed=0), points(seed=1, shift=4.0)
    m = set_metrics(real.float(), far.float())
    assert m["precision"] < 0.05 and m["density"] < 0.05
    near = set_metrics(real.float(), points(seed=2).float())
    assert m["fd"] > 10 * near["fd"] and m["kid"] > 10 * abs(near["kid"])


def test_nuisance_w1_matches_a_closed_form_shift():
    a = np.random.default_rng(0).normal(size=(500, 1))
    fid = nuisance_fidelity(a, a + 0.5, ["x"])
    assert fid["x"]["w1"] == pytest.approx(0.5) and fid["x"]["spread_ratio"] == pytest.approx(1.0)


def test_the_frozen_evaluator_is_for_the_default_recipe_and_decides_real_shapes():
    from gmmcond.config import load_config

    model, meta = load_evaluator(FROZEN)
    dataset = load_config("shapes")["dataset"]
    assert meta["dataset"] == training_config(dataset) and meta["dataset_hash"] == config_hash(training_config(dataset))
    assert meta["command"] == "python launch/evaluate.py --train-evaluator" and meta["attr_names"] == list(ATTR_NAMES)
    assert evaluator_for(dataset)[2] == FROZEN
    assert evaluator_for(dict(dataset, exclude=["triangle,red"]))[2] == FROZEN  # held-out combinations: same judge
    scores = heldout_scores(model, EvaluatorData.of(dataset), n=512)
    assert scores["heldout_accuracy"] >= 0.99, scores
    x = torch.stack([ShapesDataset(split="test")[i][0] for i in range(256)])
    first, second = model.predict(x), model.predict(x)
    assert torch.equal(first["features"], second["features"])  # the same images score the same numbers
    cov = torch.cov(model.predict(torch.stack([ShapesDataset(split="test")[i][0] for i in range(512)]))["features"].double().T)
    assert torch.linalg.eigvalsh(cov).min() > 1e-8  # FD is well posed at n = 512 in 64-d features


def test_authenticity_is_zero_for_copies_and_matches_a_brute_force_count():
    from gmmcond.eval.metrics import authenticity

    gen = torch.Generator().manual_seed(0)
    train = torch.randn(200, 3, 4, 4, generator=gen)
    copies = train[:50] + 1e-6 * torch.randn(50, 3, 4, 4, generator=gen)
    assert authenticity(copies, train)["auth_pct"] == 0.0
    assert authenticity(train[:50] + 100.0, train)["auth_pct"] == 100.0
    fake = torch.randn(80, 3, 4, 4, generator=gen)
    res = authenticity(fake, train)
    t, f = train.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    d_tt = np.linalg.norm(t[:, None] - t[None], axis=-1)
    np.fill_diagonal(d_tt, np.inf)
    d_ft = np.linalg.norm(f[:, None] - t[None], axis=-1)
    j = d_ft.argmin(1)
    expected = 100 * np.mean(d_ft[np.arange(len(f)), j] > d_tt[j].min(1))
    assert res["auth_pct"] == pytest.approx(expected) and 0 < expected < 100
    assert np.array_equal(res["nearest_index"].numpy(), j)
