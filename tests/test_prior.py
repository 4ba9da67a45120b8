"""The attribute prior a run carries, and requests whose open attributes are drawn from it (open=data)."""
import collections
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from entry import run_captured
from gmmcond.data.attrs import parse_expr
from gmmcond.data.prior import PRIOR_FILE, AttributePrior, load_prior
from gmmcond.data.shapes import ATTR_NAMES, ShapesDataset
from gmmcond.engine import train
from gmmcond.modeling.runs import load_run
from gmmcond.sampling.sheets import sample_requests
from gmmcond.sampling.settings import SamplingSettings
from gmmcond.errors import ConfigError, RunError
from gmmcond.registry import DATASETS
from gmmcond.sampling import generate
from gmmcond.sampling.requests import resolve_requests


NAMES = list(ATTR_NAMES)
GROUPS = [["circle", "square", "triangle"], ["red", "green", "blue"]]


def consistent(rows: torch.Tensor, request) -> bool:
    known = request.known > 0.5
    return bool(((rows[:, known] > 0.5) == (request.values[known] > 0.5)).all())


def test_the_prior_is_a_count_of_the_training_rows():
    data = ShapesDataset(size=16, length=600, exclude=["triangle,red"])
    prior = AttributePrior.from_dataset(data)
    direct = collections.Counter(tuple(int(v) for v in data[i][1].tolist()) for i in range(len(data)))
    table = {tuple(int(v) for v in r): int(c) for r, c in zip(prior.rows.tolist(), prior.counts.tolist())}
    assert table == dict(direct) and prior.total == 600
    assert not any(r[2] and r[3] for r in table)  # the held-out red triangle is in no training row
    # the JSON the run directory holds reads back to the same table
    again = AttributePrior.from_json(prior.to_json())
    assert torch.equal(again.rows, prior.rows) and torch.equal(again.counts, prior.counts)


@pytest.mark.parametrize("text", ["circle,red,large", "~circle,~red", "circle,~red", "large,~left,outline", "",
                                  "~circle,~square", "square,green,left,top,dark_bg,outline,~large"])
def test_drawn_rows_agree_with_the_request_and_are_training_rows(text):
    prior = AttributePrior.from_dataset(ShapesDataset(size=16, length=2000))
    request = parse_expr(text, NAMES, GROUPS)
    rows, cond = prior.draw(request, 300, torch.Generator().manual_seed(0))
    assert cond.exact and consistent(rows, request)
    seen = {tuple(r) for r in prior.rows.tolist()}
    assert all(tuple(r) in seen for r in rows.tolist())
    for group in GROUPS:  # every row names exactly one member of each group
        assert (rows[:, [NAMES.index(g) for g in group]].sum(1) == 1).all()
    # the draw follows the conditional: open attributes' frequencies within binomial noise of the table's
    freq = prior.frequencies(request)
    for name, p in freq.items():
        assert abs(rows[:, NAMES.index(name)].mean().item() - p) < 4 * (p * (1 - p) / 300) ** 0.5 + 1e-9, name
    again, _ = prior.draw(request, 300, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)  # seeded


def test_a_single_negation_draws_the_rest_of_the_group_in_its_data_proportion():
    rows = torch.tensor([[1, 0, 0, 1, 0, 0] + [0] * 5] * 50 + [[1, 0, 0, 0, 1, 0] + [0] * 5] * 30
                        + [[1, 0, 0, 0, 0, 1] + [0] * 5] * 10, dtype=torch.float32)
    prior = AttributePrior.from_rows(rows, NAMES, GROUPS)
    cond = prior.conditional(parse_expr("circle,~red", NAMES, GROUPS))
    share = {NAMES[int(r[3:6].argmax()) + 3]: float(p) for r, p in zip(cond.rows, cond.probs)}
    assert share == pytest.approx({"green": 0.75, "blue": 0.25})


def test_correlated_columns_of_an_image_folder_stay_correlated(tmp_path):
    """a and b are equal in every row, c is independent: asked for c alone, the draw keeps a == b; drawing each
    open attribute from its own marginal (the check's counterfactual) breaks it in about half the rows."""
    lines = ["file,a,b,c"]
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), 5 * i, np.uint8)).save(tmp_path / f"{i}.png")
        ab, c = int(rng.random() < 0.3), int(rng.random() < 0.5)
        lines.append(f"{i}.png,{ab},{ab},{c}")
    (tmp_path / "attrs.csv").write_text("\n".join(lines) + "\n")
    data = DATASETS.build({"type": "imagefolder_attrs", "root": str(tmp_path), "size": 8, "holdout": 0})
    prior = AttributePrior.from_dataset(data)
    request = parse_expr("c", ["a", "b", "c"])
    rows, _ = prior.draw(request, 400, torch.Generator().manual_seed(1))
    assert (rows[:, 2] == 1).all() and torch.equal(rows[:, 0], rows[:, 1]) and 0 < rows[:, 0].mean() < 1
    freq = prior.frequencies(request)
    gen = torch.Generator().manual_seed(1)
    marginal = torch.stack([torch.bernoulli(torch.full((400,), freq[n]), generator=gen) for n in ("a", "b")], 1)
    assert (marginal[:, 0] != marginal[:, 1]).float().mean() > 0.2


def test_a_held_out_combination_falls_back_on_the_product_of_experts():
    """Hand-made table: a feature f that depends on the shape and on the colour. No row is a red triangle; the
    fallback is p(f | triangle) p(f | red) / p(f), normalised, exactly."""
    def row(shape, colour, f):
        r = [0.0] * len(NAMES)
        r[NAMES.index(shape)], r[NAMES.index(colour)], r[NAMES.index("large")] = 1, 1, f
        return r
    counts = {("triangle", "green", 1): 30, ("triangle", "green", 0): 10, ("circle", "red", 1): 5,
              ("circle", "red", 0): 15, ("circle", "green", 1): 20, ("circle", "green", 0): 20}
    rows = torch.tensor([row(*k) for k, c in counts.items() for _ in range(c)])
    prior = AttributePrior.from_rows(rows, NAMES, GROUPS)
    request = parse_expr("triangle,red,~left,~top,~dark_bg,~outline", NAMES, GROUPS)
    cond = prior.conditional(request)
    assert cond.support == 0 and not cond.exact and cond.rule.startswith("product of experts p(u | triangle) p(u | red)")
    p_f = 55 / 100
    score = {1: (30 / 40) * (5 / 20) / p_f, 0: (10 / 40) * (15 / 20) / (1 - p_f)}
    expected = score[1] / (score[1] + score[0])
    got = {int(r[NAMES.index("large")]): float(p) for r, p in zip(cond.rows, cond.probs)}
    assert got[1] == pytest.approx(expected, abs=1e-12) and got[0] == pytest.approx(1 - expected, abs=1e-12)
    assert consistent(cond.rows, request)
    # the embedded data with red triangles held out: the fallback names both groups and draws every feature
    data = ShapesDataset(size=16, length=3000, exclude=["triangle,red"])
    shapes_prior = AttributePrior.from_dataset(data)
    held = parse_expr("triangle,red", NAMES, GROUPS)
    resolved = resolve_requests([held], 200, open="data", prior=shapes_prior, seed=3)
    assert consistent(resolved.attrs, held) and len(resolved.notes) == 1 and "product of experts" in resolved.notes[0]
    features = resolved.attrs[:, 6:]
    assert ((features.mean(0) - 0.5).abs() < 0.15).all()  # independent fair coins in the data


def test_open_modes_and_their_errors():
    prior = AttributePrior.from_dataset(ShapesDataset(size=16, length=300))
    request = parse_expr("circle,red", NAMES, GROUPS)
    absent = resolve_requests([request], 4, open="absent")
    assert torch.equal(absent.attrs, request.values.expand(4, -1)) and absent.known is None
    model = resolve_requests([request], 4, open="model", partial=True)
    assert torch.equal(model.known, request.known.expand(4, -1))
    with pytest.raises(ConfigError, match="open=model needs a run trained with conditioner.attr_dropout > 0"):
        resolve_requests([request], 4, open="model", partial=False)
    with pytest.raises(ConfigError, match="open='sometimes'"):
        resolve_requests([request], 4, open="sometimes", prior=prior)


def test_an_old_run_counts_its_prior_and_absent_reproduces_its_samples(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    written = load_prior(run / PRIOR_FILE)
    assert torch.equal(written.counts, AttributePrior.from_dataset(DATASETS.build(tiny_cfg()["dataset"])).counts)
    (run / PRIOR_FILE).unlink()  # a run from before priors: counted from its dataset config, and written
    loaded = load_run(run)
    assert torch.equal(loaded.prior.rows, written.rows) and (run / PRIOR_FILE).exists()
    # open=absent is what sampling did before: the request's 0/1 row, nothing drawn, the same images
    samples = sample_requests(loaded, ["circle,red", "~square"], {"open": "absent", "seed": 5, "precision": "fp32"}, n=3,
                              log=lambda m: None)
    s = loaded.cfg["sample"]
    before = generate(loaded.parts, torch.stack([parse_expr(t, NAMES, GROUPS).values for t in ("circle,red", "~square")])
                      .repeat_interleave(3, 0), SamplingSettings(s["sampler"], s["steps"], s["cfg_scale"], seed=5))
    assert torch.equal(samples.images, before)
    drawn = sample_requests(loaded, ["circle,red"], {"seed": 5}, n=6, log=lambda m: None)  # open=data, the default
    assert consistent(drawn.rows, parse_expr("circle,red", NAMES, GROUPS)) and drawn.rows[:, 6:].sum() > 0


def test_a_run_whose_data_is_gone_says_how_to_sample_it(tiny_cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = ["file,warm,cold"]
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(data / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{1 - i % 2}")
    (data / "attrs.csv").write_text("\n".join(lines) + "\n")
    cfg = tiny_cfg(f"dataset={{type: imagefolder_attrs, root: {data}, size: 16, groups: [[warm, cold]], holdout: 0}}",
                   "sample.grid_rows=[warm]", "train.batch_size=4")
    train(cfg, tmp_path / "run")
    (tmp_path / "run" / PRIOR_FILE).unlink()
    (data / "attrs.csv").unlink()
    loaded = load_run(tmp_path / "run")
    with pytest.raises(RunError, match=r"has no attr_prior.json .* ask with open=absent \(--open absent\)"):
        loaded.prior
    assert sample_requests(loaded, ["warm"], {"open": "absent"}, n=2, log=lambda m: None).images.shape == (2, 3, 16, 16)


def test_sample_cli_saves_each_sample_with_the_row_it_was_conditioned_on(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(), run)
    cmd = ["--run", run, "--attrs", "circle,red,large", "--attrs", "~circle,~square", "--n", "3", "--steps", "2",
           "--save", tmp_path / "out"]
    done = run_captured("sample", *cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'circle,red,large': open attributes drawn from the data, frequency over 3 samples: left" in done.stdout
    with open(tmp_path / "out" / "samples.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and all((tmp_path / "out" / r["file"]).exists() for r in table)
    assert all(r["open"] == "data" and r["drawn_from"] == "exact" for r in table)
    first = table[0]
    assert (first["request"], first["circle"], first["red"], first["large"]) == ("circle,red,large", "1", "1", "1")
    assert first["drawn"] == "left;top;dark_bg;outline"
    assert all(r["triangle"] == "1" and r["drawn"].startswith("red;green;blue") for r in table[3:])
    model = run_captured("sample", *cmd[:-2], "--open", "model")
    assert model.returncode == 2 and "open=model needs a run trained with conditioner.attr_dropout > 0" in model.stderr


def test_the_prior_costs_the_training_nothing(tiny_cfg, tmp_path, monkeypatch):
    """Counting the prior and drawing the grids' open attributes from it touch no random stream the training uses:
    a run whose prior is a one-row stand-in (so its grids draw other rows, from no dataset) trains bit for bit as
    the real one, grids every step in both."""
    from gmmcond.engine import trainer
    from gmmcond.io import load_checkpoint, read_metrics

    cfg = tiny_cfg("train.steps=4", "train.grid_every=1", "train.checkpoint_every=4", "sample.grid_rows=[circle]")
    train(cfg, tmp_path / "real")
    stand_in = AttributePrior.from_rows(torch.eye(len(NAMES))[:1] + torch.eye(len(NAMES))[3], NAMES, GROUPS)
    monkeypatch.setattr(trainer.AttributePrior, "from_dataset", classmethod(lambda cls, dataset: stand_in))
    train(cfg, tmp_path / "stand_in")
    assert load_prior(tmp_path / "stand_in" / PRIOR_FILE).total == 1 < load_prior(tmp_path / "real" / PRIOR_FILE).total
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "step_0000004.pt") for r in ("real", "stand_in"))
    for key in ("model", "ema"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    timeless = lambda run: [{k: v for k, v in m.items() if k not in ("sec_per_step", "peak_rss_mb")} for m in read_metrics(run / "metrics.jsonl")]
    assert timeless(tmp_path / "real") == timeless(tmp_path / "stand_in")
