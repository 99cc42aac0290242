"""The data module: embedded digits and toys, image folders, point files, and their errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import EMBEDDED_DATA, Dataset, load_data, sample_toy
from fewstep.data.points import fixed_split_indices
from fewstep.data.toys import TOY_NAMES
from fewstep.errors import UserError


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_fixed_disjoint_split():
    train, test = load_data("digits"), load_data("digits", split="test")
    assert (train.kind, train.num_classes, train.class_names) == ("image", 10, [str(k) for k in range(10)])
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.sample_shape == (1, 8, 8) and len(train) == 1437
    assert train.x.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.x.min() == -1.0 and train.x.max() == 1.0
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    again = load_data("digits")
    assert torch.equal(again.x, train.x) and torch.equal(again.labels, train.labels)
    # no test image appears in train
    a, b = train.x.flatten(1), test.x.flatten(1)
    assert not ((a[:, None] - b[None]).abs().amax(-1) == 0).any()
    assert torch.equal(train.denormalize(train.x[:3]), train.x[:3])


def test_digits_16_and_three_channels():
    d16 = load_data("digits", resolution=16)
    assert d16.x.shape == (1437, 1, 16, 16) and d16.x.min() >= -1 and d16.x.max() <= 1
    rgb = load_data("digits", channels=3)
    assert rgb.x.shape == (1437, 3, 8, 8) and torch.equal(rgb.x[:, 0], rgb.x[:, 2])
    with pytest.raises(UserError, match="8 or 16"):
        load_data("digits", resolution=32)


def test_sample_batch_is_seeded_and_keeps_labels_aligned():
    d = load_data("digits", split="test")
    x1, y1 = d.sample_batch(64, torch.Generator().manual_seed(3))
    x2, y2 = d.sample_batch(64, torch.Generator().manual_seed(3))
    assert x1.shape == (64, 1, 8, 8) and y1.shape == (64,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    idx = torch.randint(len(d), (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(x1, d.x[idx]) and torch.equal(y1, d.labels[idx])
    x, y = load_data("ring8", split="test").sample_batch(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 2) and y is None


# ---------------------------------------------------------------- 2-D toys


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shape_scale_fixed_and_split(name):
    train, test = load_data(name), load_data(name, split="test")
    assert train.x.shape == (20_000, 2) and test.x.shape == (5_000, 2) and train.x.dtype == torch.float32
    assert (train.kind, train.labels, train.num_classes, train.sample_shape) == ("points", None, 0, (2,))
    assert torch.isfinite(train.x).all()
    overall_std = train.x.std().item()
    assert 0.3 < overall_std < 1.3 and train.x.abs().max() < 3.0
    assert torch.equal(load_data(name).x, train.x)  # fixed across calls
    assert torch.equal(sample_toy(name, 5_000, 1), test.x)  # the documented seeds
    assert not torch.equal(train.x[:5_000], test.x)
    # test points are fresh draws, not copies of train points
    assert not (test.x[:500, None] == train.x[None]).all(-1).any()
    assert torch.equal(train.denormalize(test.x), test.x)


def test_toy_specific_geometry():
    moons = load_data("moons").x
    assert moons.mean(0).abs().max() < 0.02 and abs(moons.std().item() - 1.0) < 0.02
    board = load_data("checkerboard").x
    assert board.abs().max() <= 1.0
    cell = torch.floor(board * 2)  # 4x4 board of cells of side 0.5 in [-1, 1]^2: filled when the parities match
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    roll = load_data("swissroll").x
    assert roll.abs().max() < 1.2 and roll.abs().max() > 0.8


@pytest.mark.parametrize("name,num_modes", [("ring8", 8), ("grid25", 25)])
def test_mixture_samples_lie_near_a_mode(name, num_modes):
    d = load_data(name)
    assert d.modes.shape == (num_modes, 2) and d.mode_std == 0.05
    radii = d.modes.norm(dim=1)
    if name == "ring8":
        assert torch.allclose(radii, torch.ones(8))
    else:
        assert set(torch.round(d.modes * 2).flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}
    # per-coordinate distance to the nearest mode (an isotropic 2-D Gaussian puts 99.46 % in the 3-std box)
    dist = (d.x[:, None, :] - d.modes[None]).abs().amax(-1)
    nearest_dist, nearest = dist.min(1)
    assert (nearest_dist <= 3 * d.mode_std).float().mean() >= 0.99
    counts = torch.bincount(nearest, minlength=num_modes).float()
    assert (counts / len(d) - 1 / num_modes).abs().max() < 0.01  # equal weights


def test_sample_toy_is_a_pure_function_of_the_seed():
    assert torch.equal(sample_toy("grid25", 100, 7), sample_toy("grid25", 100, 7))
    assert not torch.equal(sample_toy("grid25", 100, 7), sample_toy("grid25", 100, 8))
    with pytest.raises(UserError, match="ring8"):
        sample_toy("ring9", 10, 0)
    with pytest.raises(UserError, match="positive"):
        sample_toy("moons", 0, 0)


# ---------------------------------------------------------------- image folders


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", color=(200, 30, 90)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    for k in range(6):
        _save(root / "dog" / f"d{k}.png", (20 + 3 * k, 12), color=(250, 250, 250))
        _save(root / "cat" / f"c{k}.JPG", (10, 18 + k), color=(5, 5, 5))
    _save(root / "cat" / "sub" / "c_nested.bmp", (9, 9), color=(5, 5, 5))
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def test_image_folder_with_class_subfolders(class_folder):
    train = load_data(str(class_folder), resolution=8)
    test = load_data(str(class_folder), split="test", resolution=8)
    assert (train.kind, train.num_classes, train.class_names) == ("image", 2, ["cat", "dog"])
    assert len(train) + len(test) == 13 and len(test) == 1
    assert train.x.shape == (12, 3, 8, 8) and train.x.dtype == torch.float32
    assert train.x.min() >= -1 and train.x.max() <= 1
    # labels follow the folders: cats (sorted first) are dark, dogs bright
    everything = torch.cat([train.x, test.x]).mean((1, 2, 3))
    labels = torch.cat([train.labels, test.labels])
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [7, 6]
    assert (everything[labels == 0] < -0.9).all() and (everything[labels == 1] > 0.9).all()
    assert torch.equal(load_data(str(class_folder), resolution=8).x, train.x)  # fixed split
    assert load_data(str(class_folder)).x.shape[-2:] == (32, 32)  # default resolution


def test_image_folder_centre_crops_the_shorter_side(tmp_path):
    # a 48x16 image: black, with a white 16x16 square in the centre -> all white after resize + centre crop
    a = np.zeros((16, 48, 3), dtype=np.uint8)
    a[:, 16:32] = 255
    for k in range(2):
        Image.fromarray(a).save(tmp_path / f"{k}.png")
    d = load_data(str(tmp_path), resolution=8)
    assert d.labels is None and d.num_classes == 0 and d.class_names == []
    assert d.x.shape == (1, 3, 8, 8)
    assert (d.x[..., 1:-1] > 0.95).all()  # interior columns white (bicubic may blend the edge columns)


def test_grayscale_detection_and_channel_override(tmp_path):
    gray = tmp_path / "gray"
    for k in range(3):
        _save(gray / f"{k}.png", (10, 10), mode="L", color=(40 * k,))
    d = load_data(str(gray), resolution=4)
    assert d.x.shape[1] == 1
    rgb = load_data(str(gray), resolution=4, channels=3)
    assert rgb.x.shape[1] == 3 and torch.equal(rgb.x[:, 0], rgb.x[:, 1])
    _save(gray / "colour.png", (10, 10))  # one RGB image makes the whole folder RGB
    assert load_data(str(gray), resolution=4).x.shape[1] == 3
    assert load_data(str(gray), resolution=4, channels=1).x.shape[1] == 1


def test_corrupt_image_names_the_file(tmp_path):
    for k in range(3):
        _save(tmp_path / f"ok{k}.png", (8, 8))
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(UserError) as e:
        load_data(str(tmp_path))
    assert "broken.png" in _one_line(e) and "cannot decode" in str(e.value)


def test_empty_folder_and_mixed_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(UserError) as e:
        load_data(str(tmp_path))
    msg = _one_line(e)
    assert str(tmp_path) in msg and "png" in msg and "jpeg" in msg
    _save(tmp_path / "a" / "x.png", (8, 8))
    _save(tmp_path / "loose.png", (8, 8))
    with pytest.raises(UserError, match="loose"):
        load_data(str(tmp_path))


# ---------------------------------------------------------------- point files


def _raw_points(n: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * np.array([5.0, 1.0, 0.1]) + np.array([100.0, -3.0, 0.5])


def _check_round_trip(spec: str, raw: np.ndarray) -> None:
    train, test = load_data(spec), load_data(spec, split="test")
    assert train.kind == "points" and train.sample_shape == (3,) and train.labels is None
    assert len(train) == 54 and len(test) == 6
    # standardised with the train split's mean and one overall std
    assert train.x.mean(0).abs().max() < 1e-4 and abs(train.x.pow(2).mean().sqrt().item() - 1) < 1e-4
    for split, d in (("train", train), ("test", test)):
        back = d.denormalize(d.x).double().numpy()
        np.testing.assert_allclose(back, raw[fixed_split_indices(len(raw), split)], rtol=1e-5, atol=1e-4)
    assert torch.equal(test.shift, train.shift) and torch.equal(test.scale, train.scale)


def test_npy_round_trip(tmp_path):
    raw = _raw_points()
    np.save(tmp_path / "pts.npy", raw)
    _check_round_trip(str(tmp_path / "pts.npy"), raw)


def test_csv_with_header_round_trip(tmp_path):
    raw = _raw_points(seed=1)
    lines = ["x,y,z"] + [",".join(f"{v:.10g}" for v in row) for row in raw]
    (tmp_path / "pts.csv").write_text("\n".join(lines) + "\n")
    _check_round_trip(str(tmp_path / "pts.csv"), raw)
    (tmp_path / "noheader.csv").write_text("\n".join(lines[1:]))
    assert torch.equal(load_data(str(tmp_path / "noheader.csv")).x, load_data(str(tmp_path / "pts.csv")).x)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("word.csv", "x,y\n1,2\n3,abc\n5,6\n", "line 3, column 2 is 'abc'"),
        ("ragged.csv", "1,2\n3\n5,6\n", "line 2 has 1 columns"),
        ("empty.csv", "", "no points"),
        ("nan.csv", "1,2\nnan,3\n4,5\n", "NaN or infinite"),
    ],
)
def test_bad_csv(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match) as e:
        load_data(str(tmp_path / name))
    assert name in _one_line(e)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, 4.0]]), "NaN or infinite"),
        (np.array([[1.0, np.inf], [0.0, 0.0]]), "NaN or infinite"),
        (np.arange(5.0), "2-D array"),
        (np.zeros((1, 2)), "at least 2 points"),
        (np.array([["a", "b"], ["c", "d"]]), "not a real number type"),
    ],
)
def test_bad_npy(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=match) as e:
        load_data(str(tmp_path / "bad.npy"))
    assert "bad.npy" in _one_line(e)


# ---------------------------------------------------------------- specs and options


def test_unknown_spec_lists_embedded_names_and_path_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("1,2\n")
    for spec in ("mnist", str(tmp_path / "missing.npy"), str(tmp_path / "a.txt")):
        with pytest.raises(UserError) as e:
            load_data(spec)
        msg = _one_line(e)
        assert all(name in msg for name in EMBEDDED_DATA) and ".npy" in msg and "folder" in msg


def test_bad_options():
    with pytest.raises(UserError, match="split"):
        load_data("digits", split="val")
    with pytest.raises(UserError, match="channels"):
        load_data("digits", channels=2)
    # resolution / channels are ignored for points (TeacherConfig.resolution documents this)
    grid = load_data("grid25", resolution=8, channels=3)
    assert isinstance(grid, Dataset) and torch.equal(grid.x, load_data("grid25").x)
