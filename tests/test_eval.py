"""fewstep.eval: metrics against reference formulas, the shipped digits classifier, Inception FID plumbing, pictures,
the report and evaluate_samples."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data.digits import digits_arrays
from fewstep.errors import UserError
from fewstep.eval.classifier import (DEFAULT_PATH, DigitsClassifier, accuracy, load_digits_classifier,
                                     train_digits_classifier)
from fewstep.eval.classifier import main as classifier_main
from fewstep.eval.evaluate import evaluate_samples
from fewstep.eval.images import plot_curves, save_grid, save_points
from fewstep.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, inception_fid
from fewstep.eval.metrics import (feature_stats, frechet_distance, mode_metrics, precision_recall,
                                  sliced_wasserstein)
from fewstep.eval.report import format_value, write_report
from tiny import TinyExtractor


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _fid_sqrtm_reference(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's calculate_frechet_distance, with scipy.linalg.sqrtm."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_sqrtm_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fid_sqrtm_reference(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric


def test_frechet_distance_closed_form_diagonal_and_self():
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, -2.0])
    # diagonal: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2
    expected = 9.0 + 16.0 + ((1 - 3) ** 2 + (2 - 1) ** 2 + 0.0)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)

    feats = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
    mu, sigma = feature_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (32, 32)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-12)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_singular_covariance_is_safe():
    # a dead feature (constant column) makes both covariances singular; it must not change the distance
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) * 1.5 + 0.3
    dead = lambda f: np.concatenate([f, np.zeros((len(f), 1))], axis=1)  # noqa: E731
    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    fd_dead = frechet_distance(*feature_stats(dead(a)), *feature_stats(dead(b)))
    assert math.isfinite(fd_dead) and fd_dead == pytest.approx(fd, rel=1e-9)
    with pytest.raises(UserError, match="matching shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _clusters(rng: np.random.Generator, n_per: int, centres: np.ndarray, std: float = 0.1) -> np.ndarray:
    return np.concatenate([c + std * rng.normal(size=(n_per, centres.shape[1])) for c in centres])


def test_precision_recall_cases():
    rng = np.random.default_rng(0)
    centres = 10 * rng.normal(size=(5, 4))
    real = _clusters(rng, 100, centres)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)
    collapsed = _clusters(rng, 500, centres[:1])  # all mass on one of five clusters
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.3
    # chunked distance blocks give the same answer
    assert precision_recall(real, collapsed, chunk=37) == (p, r)
    with pytest.raises(UserError, match="more than 3 samples"):
        precision_recall(real[:3], real)


def test_sliced_wasserstein():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 2))
    assert sliced_wasserstein(x, x) == 0.0
    shift = np.array([1.5, 0.0])
    y = rng.normal(size=(4000, 2)) + shift
    # W1 of a shifted copy along theta is |shift . theta|; E|cos| on the circle is 2 / pi
    assert sliced_wasserstein(x, y) == pytest.approx(1.5 * 2 / math.pi, rel=0.05)
    assert sliced_wasserstein(x, y, seed=1) != sliced_wasserstein(x, y, seed=0)
    # in 1-D every direction is +-1, so unequal-size sets must give the exact 1-D W1
    a, b = rng.normal(size=(7, 1)), rng.exponential(size=(11, 1))
    assert sliced_wasserstein(a, b, n_projections=4) == pytest.approx(wasserstein_distance(a[:, 0], b[:, 0]), rel=1e-9)


def test_mode_metrics_rule():
    angles = np.arange(8) * 2 * np.pi / 8
    modes = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    std = 0.05
    rng = np.random.default_rng(0)
    on = [modes[m] + std * rng.normal(size=(100, 2)).clip(-2, 2) for m in range(4)]  # 4 modes, well inside 3 sigma
    stray = modes[4] + np.zeros((2, 2))  # 2 samples < threshold max(1, 0.1 * 500 / 8) = 6.25: not covered
    far = np.zeros((98, 2))  # the centre: distance 1 from every mode, not high quality
    out = mode_metrics(np.concatenate(on + [stray, far]), modes, std)
    assert out == {"modes_covered": 4, "high_quality": pytest.approx(402 / 500)}
    assert mode_metrics(modes.repeat(10, axis=0), modes, std)["modes_covered"] == 8
    assert mode_metrics(modes.repeat(10, axis=0) + 0.2, modes, std) == {"modes_covered": 0, "high_quality": 0.0}
    assert mode_metrics(modes.repeat(10, axis=0) + 0.2, modes, std, n_sigma=6.0)["modes_covered"] == 8


# ------------------------------------------------------------------------------------------------ classifier


@pytest.fixture(scope="module")
def shipped() -> DigitsClassifier:
    return load_digits_classifier()


@pytest.fixture(scope="module")
def digits():
    return digits_arrays("train", 8), digits_arrays("test", 8)


def test_shipped_classifier_accuracy_reproduces(shipped, digits):
    meta = json.loads(DEFAULT_PATH.with_suffix(".json").read_text())
    assert meta["test_accuracy"] >= 0.95 and "fewstep.eval.classifier" in meta["command"]
    (_, _), (x_test, y_test) = digits
    assert abs(accuracy(shipped, x_test, y_test) - meta["test_accuracy"]) <= 1.5 / len(y_test)
    assert shipped.test_accuracy == meta["test_accuracy"]
    # 16x16 digits go through the average-pool path and are still recognised
    x16, y16 = digits_arrays("test", 16)
    assert accuracy(shipped, x16, y16) >= 0.95


def test_classifier_shapes_and_input_checks(shipped, digits):
    x = digits[1][0][:5]
    assert shipped(x).shape == (5, 10) and shipped.features(x).shape == (5, 64)
    x16 = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # avg-pooling undoes this exactly
    torch.testing.assert_close(shipped.features(x16), shipped.features(x))
    with pytest.raises(UserError, match="inception_fid"):
        shipped(torch.zeros(2, 3, 32, 32))


def test_train_is_reproducible_and_save_load_roundtrip(tmp_path):
    m1, _ = train_digits_classifier(iterations=4, seed=3, batch_size=32)
    m2, _ = train_digits_classifier(iterations=4, seed=3, batch_size=32)
    m3, _ = train_digits_classifier(iterations=4, seed=4, batch_size=32)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)

    out = tmp_path / "clf"
    classifier_main(["--out", str(out), "--iterations", "3", "--seed", "1"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"] == DigitsClassifier().config and "--iterations 3 --seed 1" in meta["command"]
    loaded = load_digits_classifier(out.with_suffix(".safetensors"))
    x = digits_arrays("test", 8)[0][:8]
    assert loaded.test_accuracy == meta["test_accuracy"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert loaded(x).shape == (8, 10)

    with pytest.raises(UserError, match=r"missing\.safetensors.*python -m fewstep\.eval\.classifier"):
        load_digits_classifier(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------- inception


def test_inception_fid_missing_weights_names_the_file(tmp_path, monkeypatch):
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(UserError, match=WEIGHTS_FILE) as e:
        inception_fid(x, x, weights_path=tmp_path / "nope.pth")
    assert WEIGHTS_ENV in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(UserError, match="env.pth"):
        inception_fid(x, x)
    monkeypatch.delenv(WEIGHTS_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"\.cache/fewstep/pt_inception-2015-12-05-6726825d\.pth"):
        inception_fid(x, x)


def test_inception_fid_with_tiny_extractor_matches_our_fid():
    pytest.importorskip("torchmetrics")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(200, 1, 12, 12, generator=g) * 2 - 1
    net = TinyExtractor()
    same = inception_fid(real, real.clone(), feature_extractor=net, batch_size=64)
    assert abs(same) < 1e-4
    fake = (torch.rand(200, 1, 12, 12, generator=g) * 2 - 1) * 0.5 + 0.3
    fid = inception_fid(real, fake, feature_extractor=net)
    # the same number from our Frechet distance on the same uint8 features
    to_u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)  # noqa: E731
    with torch.no_grad():
        ours = frechet_distance(*feature_stats(net(to_u8(fake))), *feature_stats(net(to_u8(real))))
    assert fid > 100 * max(same, 1e-6) and fid == pytest.approx(ours, rel=1e-3)


# ---------------------------------------------------------------------------------------------------- images


def test_save_grid_layout_and_values(tmp_path):
    imgs = torch.full((10, 1, 8, 8), -1.0)
    imgs[1] = 1.0
    path = save_grid(imgs, tmp_path / "g" / "grid.png")
    img = Image.open(path)
    # 4 per row, 8 px upscaled 6x = 48 px tiles, 2 px gutters
    assert img.mode == "L" and img.size == (4 * 50 + 2, 3 * 50 + 2)
    a = np.asarray(img)
    assert a[2 + 24, 2 + 24] == 0 and a[2 + 24, 52 + 24] == 255 and a[0, 0] == 128
    rgb = Image.open(save_grid(torch.zeros(3, 3, 16, 16), tmp_path / "rgb.png", nrow=3))
    assert rgb.mode == "RGB" and rgb.size == (3 * 50 + 2, 52)  # 16 px * 3 = 48
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(UserError):
        save_grid(torch.zeros(2, 8, 8), tmp_path / "bad.png")


def test_save_points_and_plot_curves(tmp_path):
    rng = np.random.default_rng(0)
    p = save_points(rng.normal(size=(500, 3)), tmp_path / "p.png", reference=rng.normal(size=(800, 3)),
                    title="grid25", lim=3.0)
    assert Image.open(p).size[0] > 100
    with pytest.raises(UserError, match="D >= 2"):
        save_points(np.zeros((5, 1)), tmp_path / "q.png")
    rows = [{"it": i, "loss": 1.0 / (i + 1), "fid": None if i % 2 else 5.0 - i * 0.1} for i in range(20)]
    assert Image.open(plot_curves(rows, ["loss", "fid"], tmp_path / "c.png", title="t")).size[0] > 100
    with pytest.raises(UserError, match="no finite values"):
        plot_curves(rows, ["missing"], tmp_path / "d.png")


# ---------------------------------------------------------------------------------------------------- report


def test_write_report_escapes_and_formats(tmp_path):
    sections = [
        {"heading": "Metrics <b>", "text": "para one\n\npara <script>two</script>",
         "table": [{"method": "dmd2", "fid": 1.23456789, "modes": 25}, {"method": "add", "fid": None, "x": 1e-7}],
         "images": [("samples & grid", "samples/grid 1.png")], "code": "lr: 1e-3\nname: <x>"},
        {"heading": "Empty"},
    ]
    save_grid(torch.zeros(1, 1, 8, 8), tmp_path / "samples" / "grid 1.png")  # embedded, not linked
    html_text = write_report(tmp_path / "report.html", "Run <1>", sections).read_text()
    assert "<script>" not in html_text and "&lt;script&gt;two" in html_text
    assert "<title>Run &lt;1&gt;</title>" in html_text and "Metrics &lt;b&gt;" in html_text
    assert "<td>1.235</td>" in html_text and "<td>25</td>" in html_text and "<td>\u2014</td>" in html_text
    assert "<td>1e-07</td>" in html_text and "<th>x</th>" in html_text
    assert 'src="data:image/png;base64,' in html_text and "samples &amp; grid" in html_text
    assert "name: &lt;x&gt;" in html_text and html_text.count("<section>") == 2
    assert format_value(np.float32(0.5)) == "0.5" and format_value(torch.tensor(3)) == "3"


# -------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_samples_digits(shipped, digits):
    (x_train, y_train), (x_test, y_test) = digits
    data = SimpleNamespace(kind="image", x=x_test, labels=y_test, modes=None, mode_std=None)
    real = evaluate_samples(x_train[:360], data, labels=y_train[:360], classifier=shipped)
    assert set(real) == {"fid", "precision", "recall", "class_accuracy"}
    assert all(type(v) is float for v in real.values())
    assert real["fid"] < 5 and real["precision"] > 0.8 and real["recall"] > 0.7 and real["class_accuracy"] > 0.95
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluate_samples(noise, data, classifier=shipped)
    assert bad["fid"] > 10 * real["fid"] and bad["fid"] > 30 and bad["recall"] < 0.1 and bad["class_accuracy"] is None
    wrong = evaluate_samples(x_train[:360], data, labels=(y_train[:360] + 1) % 10, classifier=shipped)
    assert wrong["class_accuracy"] < 0.05
    with pytest.raises(UserError, match="inception_fid"):
        evaluate_samples(torch.zeros(8, 3, 32, 32), SimpleNamespace(kind="image", x=torch.zeros(8, 3, 32, 32)))
    with pytest.raises(UserError, match="shape"):
        evaluate_samples(torch.zeros(8, 1, 16, 16), data, classifier=shipped)


def test_evaluate_samples_points():
    angles = torch.arange(8) * 2 * math.pi / 8
    modes = torch.stack([angles.cos(), angles.sin()], dim=1)
    g = torch.Generator().manual_seed(0)

    def draw(n: int, ms: torch.Tensor) -> torch.Tensor:
        return ms[torch.randint(0, len(ms), (n,), generator=g)] + 0.05 * torch.randn(n, 2, generator=g)

    data = SimpleNamespace(kind="points", x=draw(2000, modes), modes=modes, mode_std=0.05)
    good = evaluate_samples(draw(1000, modes), data)
    collapsed = evaluate_samples(draw(1000, modes[:2]), data)
    assert good["modes_covered"] == 8 and good["high_quality"] > 0.95 and isinstance(good["modes_covered"], int)
    assert collapsed["modes_covered"] == 2 and collapsed["sliced_w"] > 5 * good["sliced_w"]
    plain = evaluate_samples(draw(100, modes), SimpleNamespace(kind="points", x=data.x, modes=None, mode_std=None))
    assert plain["modes_covered"] is None and plain["high_quality"] is None and plain["sliced_w"] > 0
