"""The evaluation protocol: matched references, requests and known masks, defect flags, per-set diversity."""
import pytest
import torch
from torch.utils.data import Dataset

from gmmcond.data import shapes as S
from gmmcond.data.protocol import GenericProtocol, TableProtocol, protocol_class, protocol_for
from gmmcond.errors import DatasetError
from gmmcond.eval import evaluate
from gmmcond.eval.evaluate import Heldout, defect_flags, heldout, per_set_diversity
from gmmcond.eval.evaluator import FROZEN, load_evaluator
from gmmcond.sampling.settings import SamplingSettings

SHAPES = {"type": "shapes", "size": 16, "length": 20000, "seed": 0, "variation": 1.0, "label_mode": "features",
          "exclude": None}


class Table(Dataset):
    """Images whose pixels encode their index, with a given attribute table."""

    def __init__(self, rows):
        self.attrs = torch.tensor(rows, dtype=torch.float32)
        self.attr_names, self.groups = [f"a{k}" for k in range(self.attrs.shape[1])], []

    def __len__(self):
        return len(self.attrs)

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), self.attrs[i], i


def table_protocol(rows, cls=TableProtocol):
    data = Table(rows)

    class Fixed(cls):
        @classmethod
        def views(cls, dataset_cfg):
            return data, data

    return Fixed({"type": "table"})


def test_shapes_reference_has_a_rows_with_other_nuisances():
    protocol = protocol_for(SHAPES)
    ref = protocol.reference(32)
    target, known = protocol.requested(32)
    assert torch.equal(ref.rows, target) and known.all() and ref.rows_matched == 1.0
    for i in range(32):
        a, b = protocol.eval_set.params(i), protocol.eval_set.redraw(i)
        assert S.fixed_attrs(a) == S.fixed_attrs(b) and (a.cx, a.cy, a.radius) != (b.cx, b.cy, b.radius)
        assert torch.equal(ref.images[i], protocol.eval_set.image(b))
    real_x, cond = protocol.set_a(32)
    assert torch.equal(cond, target) and not torch.equal(real_x, ref.images)


def test_a_class_run_fixes_shape_and_colour_only():
    protocol = protocol_for({**SHAPES, "label_mode": "classes"})
    target, known = protocol.requested(8)
    assert protocol.cond_set.attr_names == list(S.CLASS_NAMES) and protocol.attr_names == list(S.ATTR_NAMES)
    assert known[0].tolist() == [1.0] * 6 + [0.0] * 5 and known.shape == target.shape == (8, 11)
    cond = protocol.set_a(8)[1]
    for i in range(8):  # the class label names the shape and colour of the features row
        shape, colour = S.CLASS_NAMES[int(cond[i].argmax())].split("_")
        assert target[i, S.ATTR_NAMES.index(shape)] == 1 and target[i, S.ATTR_NAMES.index(colour)] == 1
    assert protocol_for({**SHAPES, "label_mode": "combinations"}).requested(4)[1].all()


def test_the_generic_reference_matches_rows_then_takes_the_nearest_left():
    rows = [[1, 0], [0, 1], [1, 1], [1, 1],  # A (n = 4)
            [0, 1], [0, 0], [1, 0], [1, 1], [1, 0]]  # the pool: one [1, 1] for two A rows
    ref = table_protocol(rows).reference(4)
    picked = ref.images[:, 0, 0, 0].long().tolist()
    assert picked == [6, 4, 7, 8]  # the lowest unused match; then the nearest row left ([1, 0], not [0, 0])
    assert ref.rows_matched == 0.75 and "3 of 4 exact" in ref.description
    assert torch.equal(ref.rows[:3], torch.tensor(rows[:3], dtype=torch.float32))
    assert (ref.rows[3] - torch.tensor([1.0, 1.0])).abs().sum() == 1  # the nearest row that was left
    with pytest.raises(DatasetError, match="reference needs 2n"):
        table_protocol(rows).reference(5)


def test_the_generic_protocol_reads_rows_from_items_and_tables_alike():
    rows = [[k % 2, k % 3 == 0] for k in range(12)]
    generic, table = table_protocol(rows, GenericProtocol).reference(6), table_protocol(rows).reference(6)
    assert torch.equal(generic.images, table.images) and generic.rows_matched == table.rows_matched == 1.0
    assert protocol_class({"type": "celeba"}) is TableProtocol and protocol_class({"type": "mine"}) is GenericProtocol
    assert protocol_class(SHAPES) is S.ShapesProtocol


def test_defect_flags_use_the_renderer_rule_where_there_is_one():
    protocol = protocol_for(SHAPES)
    real_x, _ = protocol.set_a(6)
    target, known = protocol.requested(6)
    blank = torch.ones_like(real_x[:2])  # white: no plain background of either class
    images = torch.cat([real_x[:4], blank])
    probs = torch.full((6, 11), 0.4)  # an unsure evaluator everywhere: not a defect under the renderer's rule
    feats = torch.zeros(6, 4)
    reasons = defect_flags(protocol, images, probs, target, known, feats, feats)
    assert reasons[:4] == ["ok"] * 4 and all(r != "ok" for r in reasons[4:])


def test_defect_flags_without_a_rule_mark_far_and_unsure_images():
    protocol = table_protocol([[1, 0]] * 8)
    protocol.groups = [["a0", "a1"]]
    real = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    feats = torch.cat([real[:2], real[:1] + 100.0, real[2:3]])
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.3], [0.9, 0.1], [0.2, 0.3]])
    reasons = defect_flags(protocol, torch.zeros(4, 3, 4, 4), probs, torch.zeros(4, 2), torch.ones(4, 2), feats, real)
    assert reasons == ["ok", "unsure evaluator", "far from real data", "unsure evaluator"]


def test_per_set_metrics_of_an_identical_set_equal_their_perfect_values():
    """Samples that are the real per-set draws themselves: recall and coverage 1, W1 0, spread ratio 1."""
    protocol = protocol_for(SHAPES)
    real_x, cond = protocol.set_a(16)
    target, known = protocol.requested(16)
    sets = Heldout(protocol, real_x, cond, target, known, protocol.reference(16))

    class Copies(evaluate.RowSampler):
        def __call__(self, attrs, *args, **kw):
            i = next(k for k in range(len(cond)) if torch.equal(cond[k], attrs[0]))
            return protocol.set_draws(i, len(attrs), 100)

    model = load_evaluator(FROZEN)[0]
    rows, (grid, captions) = per_set_diversity(Copies(None, SamplingSettings()), sets, model,
                                               evaluate.EvalSize(n=16, sets=3, per_set=24))
    assert len(rows) == 3 == len({r["attrs"] for r in rows}) and len(grid) == 6
    for r in rows:
        assert r["recall"] == r["coverage"] == r["precision"] == 1.0
        assert r["mean_nuisance_w1"] == 0 and r["mean_spread_ratio"] == pytest.approx(1.0, abs=1e-9)
        assert r["reference"]["mean_nuisance_w1"] > 0  # another real draw of the same set differs
        circle = r["attrs"].startswith("circle")
        assert ("angle_cos" in r["nuisances"]) != circle  # a circle's rotation is not scored


def test_heldout_refuses_an_evaluator_of_other_attributes():
    with pytest.raises(DatasetError, match="pass --evaluator trained on this dataset's labels"):
        heldout(SHAPES, 8, ["warm", "cold"])
