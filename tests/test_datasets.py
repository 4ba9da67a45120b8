import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmmcond.errors import DatasetError
from entry import ROOT, assert_one_line, run_entry
from gmmcond.registry import DATASETS
from gmmcond.data.local import held_out
from gmmcond.data.shapes import ATTR_NAMES, CLASS_NAMES, ShapesDataset
from gmmcond.data.attrs import parse_expr
from gmmcond.errors import AttributeSpecError


def check_item(item, k, size):
    image, attrs, index = item
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert attrs.shape == (k,) and set(attrs.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(index, int)


def test_shapes_is_deterministic_and_well_formed():
    a, b = ShapesDataset(size=16), ShapesDataset(size=16)
    assert len(a.attr_names) >= 10 and a.attr_names == list(ATTR_NAMES)
    for i in range(20):
        check_item(a[i], 11, 16)
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[0][0], ShapesDataset(size=16, split="test")[0][0])


def test_shapes_groups_are_mutually_exclusive_and_features_intersect():
    data = ShapesDataset(size=16)
    attrs = torch.stack([data[i][1] for i in range(400)])
    for group in data.groups:
        cols = [data.attr_names.index(n) for n in group]
        assert (attrs[:, cols].sum(1) == 1).all()
    free = attrs[:, [data.attr_names.index(n) for n in ("large", "left", "top", "dark_bg", "outline")]]
    assert ((free.mean(0) - 0.5).abs() < 0.1).all()  # fair coins
    assert (free.sum(1) >= 2).float().mean() > 0.5  # features intersect within one image


def test_shapes_render_what_the_attributes_say():
    data = ShapesDataset(size=32)
    for i in range(30):
        p = data.params(i)
        image = data[i][0]
        corner = image[:, 0, 0]
        assert (corner.mean() < 0) == p.dark_bg
        dominant = image.flatten(1).sub(corner[:, None]).abs().sum(0) > 0.5  # foreground pixels
        rgb = image.flatten(1)[:, dominant].mean(1)
        assert rgb.argmax().item() == {"red": 0, "green": 1, "blue": 2}[p.colour] or p.outline


def test_shapes_class_mode_is_one_hot_shape_by_colour():
    data = ShapesDataset(size=16, label_mode="classes")
    assert data.attr_names == list(CLASS_NAMES) and len(CLASS_NAMES) == 9
    for i in range(20):
        _, attrs, _ = data[i]
        p = data.params(i)
        assert attrs.sum() == 1 and data.attr_names[int(attrs.argmax())] == f"{p.shape}_{p.colour}"


def test_shapes_rejects_bad_size():
    with pytest.raises(DatasetError, match="between 16 and 64"):
        ShapesDataset(size=8)


def write_celeba(root, n=6, names=("Smiling", "Male", "Eyeglasses")):
    (root / "img_align_celeba").mkdir(parents=True)
    lines = [str(n), " ".join(names)]
    parts = []
    for i in range(n):
        f = f"{i + 1:06d}.jpg"
        Image.fromarray(np.full((218, 178, 3), 20 * i, np.uint8)).save(root / "img_align_celeba" / f)
        lines.append(f + " " + " ".join("1" if (i + j) % 2 else "-1" for j in range(len(names))))
        parts.append(f"{f} {0 if i < 4 else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")


def test_celeba_official_layout(tmp_path):
    write_celeba(tmp_path)
    data = DATASETS.build({"type": "celeba", "root": str(tmp_path), "size": 16})
    test = DATASETS.build({"type": "celeba", "root": str(tmp_path), "size": 16, "split": "test"})
    assert len(data) == 4 and len(test) == 2
    assert data.attr_names == ["Smiling", "Male", "Eyeglasses"]
    check_item(data[1], 3, 16)
    assert data[1][1].tolist() == [1.0, 0.0, 1.0]  # -1 becomes 0


def test_celeba_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetError, match="CelebA image folder .* not found: .*img_align_celeba"):
        DATASETS.build({"type": "celeba", "root": str(tmp_path)})
    write_celeba(tmp_path)
    (tmp_path / "list_attr_celeba.txt").write_text("6\nSmiling Male\n000001.jpg 1\n")
    with pytest.raises(DatasetError, match="expected 6 rows of 2 values each"):
        DATASETS.build({"type": "celeba", "root": str(tmp_path)})


def write_cifar(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {b"data": np.random.RandomState(i).randint(0, 256, (n, 3072), dtype=np.uint8), b"labels": [(i + k) % 10 for k in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_pickles(tmp_path):
    write_cifar(tmp_path)
    data = DATASETS.build({"type": "cifar10", "root": str(tmp_path)})
    assert len(data) == 20 and data.attr_names[0] == "airplane" and data.groups == [data.attr_names]
    check_item(data[5], 10, 32)
    assert data[5][1].argmax().item() == 2 and data[5][1].sum() == 1  # data_batch_2, 2nd image: (1 + 1) % 10
    assert len(DATASETS.build({"type": "cifar10", "root": str(tmp_path / "cifar-10-batches-py"), "split": "test"})) == 4
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3: not a CIFAR-10 pickle"):
        DATASETS.build({"type": "cifar10", "root": str(tmp_path)})


def test_imagefolder_attrs(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 50 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "attrs.csv").write_text("file,cat,dog,fluffy\nim0.png,1,0,1\nim1.png,0,1,0\nim2.png,-1,1,1\n")
    node = {"type": "imagefolder_attrs", "root": str(tmp_path), "size": 16, "groups": [["cat", "dog"]]}
    data = DATASETS.build(dict(node, split="all"))
    assert data.attr_names == ["cat", "dog", "fluffy"] and len(data) == 3
    check_item(data[2], 3, 16)
    assert data[2][1].tolist() == [0.0, 1.0, 1.0]
    halves = [DATASETS.build(dict(node, split=s, holdout=0.5)).files for s in ("train", "test")]
    assert sorted(halves[0] + halves[1]) == ["im0.png", "im1.png", "im2.png"]  # a partition, by file-name hash
    assert halves == [[f for f in data.files if held_out(f, 0.5) == t] for t in (False, True)]


def test_imagefolder_attrs_split_column_decides_the_held_out_set(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "attrs.csv").write_text("file,cat,split\nim0.png,1,test\nim1.png,0,train\nim2.png,1,train\n")
    node = {"type": "imagefolder_attrs", "root": str(tmp_path), "size": 8}
    test, train = DATASETS.build(dict(node, split="test")), DATASETS.build(node)
    assert test.files == ["im0.png"] and train.files == ["im1.png", "im2.png"] and test.attr_names == ["cat"]
    (tmp_path / "attrs.csv").write_text("file,cat,split\nim0.png,1,valid\n")
    with pytest.raises(DatasetError, match=r"attrs.csv:2: the split column must say train or test, got 'valid'"):
        DATASETS.build(node)


@pytest.mark.parametrize("csv,message", [
    ("file,cat\nim0.png,2\n", r"attrs.csv:2: attribute values must be 0/1 or -1/1"),
    ("file,cat\nim0.png,yes\n", r"attrs.csv:2: attribute values must be 0/1 or -1/1"),
    ("file,cat\nim0.png\n", r"attrs.csv:2: 1 columns, header has 2"),
    ("file,cat\nmissing.png,1\n", r"1 listed images are missing .* e.g. missing.png"),
])
def test_imagefolder_attrs_malformed(tmp_path, csv, message):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "im0.png")
    (tmp_path / "attrs.csv").write_text(csv)
    with pytest.raises(DatasetError, match=message):
        DATASETS.build({"type": "imagefolder_attrs", "root": str(tmp_path)})


def test_exclude_holds_back_attribute_sets_and_names_unknown_attributes():
    data = ShapesDataset(size=16, exclude=["triangle,red", "circle,green"])
    seen = {(data.params(i).shape, data.params(i).colour) for i in range(600)}
    assert ("triangle", "red") not in seen and ("circle", "green") not in seen and len(seen) == 7
    plain = ShapesDataset(size=16)
    assert all(data.params(i) == plain.params(i) for i in range(50) if not data.excluded(plain.params(i)))
    with pytest.raises(DatasetError, match=r"dataset.exclude: 'triangle,purple' must list attribute names .* unknown \['purple'\]"):
        ShapesDataset(exclude=["triangle,purple"])


def test_variation_zero_is_the_earlier_geometry_and_one_varies_every_nuisance():
    import random

    from gmmcond.data.shapes import JITTER, OFFSET, draw_params

    fixed = [draw_params(random.Random(i), variation=0) for i in range(200)]
    assert all(abs(abs(p.cx - 0.5) - OFFSET) <= JITTER + 1e-9 and p.angle == 0 and p.fill_shade == 1 for p in fixed)
    varied = np.stack([draw_params(random.Random(i)).nuisances() for i in range(200)])
    assert (varied.std(0) > 0.02).all()  # position, radius, angle, fill and background shade all vary


def test_attribute_expressions_and_group_contradictions():
    names, groups = ["circle", "square", "triangle", "red", "large"], [["circle", "square", "triangle"]]
    req = parse_expr("triangle, ~red", names, groups)  # a present member specifies its group: circle, square absent
    assert req.values.tolist() == [0, 0, 1, 0, 0] and req.known.tolist() == [1, 1, 1, 1, 0]
    with pytest.raises(AttributeSpecError, match=r"lists \['circle', 'square'\], but the group"):
        parse_expr("circle,square", names, groups)
    with pytest.raises(AttributeSpecError, match="negates every member of the group"):
        parse_expr("~circle,~square,~triangle", names, groups)
    with pytest.raises(AttributeSpecError, match=r"asks for \['red'\] both present and absent"):
        parse_expr("red,~red", names, groups)
    assert parse_expr("~circle", names, groups).known.tolist() == [1, 0, 0, 0, 0]
    implied = parse_expr("~circle,~square", names, groups)  # the one member left of an exclusive group is present
    assert implied.values.tolist() == [0, 0, 1, 0, 0] and implied.known.tolist() == [1, 1, 1, 0, 0]


def test_an_image_that_does_not_decode_is_named_with_its_csv_row(tmp_path):
    write_folder(tmp_path)
    data = (tmp_path / "img_005.png").read_bytes()
    (tmp_path / "img_005.png").write_bytes(data[: len(data) // 2])
    recipe = tmp_path / "folder.yaml"
    recipe.write_text((ROOT / "registry" / "shapes_tiny.yaml").read_text().replace(
        "  type: shapes\n  size: 16\n  length: 256", f"  type: imagefolder_attrs\n  root: {tmp_path}\n  size: 16\n  holdout: 0"))
    code, err = run_entry("train", "--config", recipe, "--runs", tmp_path / "runs", "sample.grid_rows=[cat]")
    assert_one_line(code, err, f"{tmp_path / 'img_005.png'} (listed at {tmp_path / 'attrs.csv'}:7) does not decode")


def test_a_csv_whose_first_column_is_not_file_names_says_so(tmp_path):
    from gmmcond.errors import DatasetError
    from gmmcond.registry import DATASETS

    (tmp_path / "attrs.csv").write_text("id,cat,dog\n0,1,0\n1,0,1\n")
    with pytest.raises(DatasetError, match=r"the first column \('id'\) must hold the image file names"):
        DATASETS.build({"type": "imagefolder_attrs", "root": str(tmp_path), "holdout": 0})


def write_folder(root: Path, n: int = 12, header: str = "file,cat,dog") -> None:
    rows = [header]
    for i in range(n):
        Image.new("RGB", (20, 20), (10 * i, 0, 0)).save(root / f"img_{i:03d}.png")
        rows.append(f"img_{i:03d}.png,{i % 2},{1 - i % 2}")
    (root / "attrs.csv").write_text("\n".join(rows) + "\n")
