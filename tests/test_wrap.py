"""A user's own nn.Module as the teacher (fewstep.wrap): the README's example run as written, the parameterisations
and conditions against analytic denoisers, saving and loading, data in memory, and the one-line errors."""
from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import fewstep
from fewstep.diffusion.denoiser import CFGDenoiser
from fewstep.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in the README."""
    text = README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_own_network_example_runs_and_the_student_beats_the_teachers_one_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # run as a module of its own, so EDMNet's import path (recorded with init_args) resolves when reloading
    mod = types.ModuleType("readme_own_network")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    exec(compile(readme_block("Your own network"), "README.md: Your own network", "exec"), mod.__dict__)
    ns = mod.__dict__
    assert isinstance(ns["student"], fewstep.Student) and ns["student"].steps == 1
    assert ns["samples"].shape == (1000, 2) and torch.isfinite(ns["samples"]).all()
    net = json.loads((tmp_path / "runs/own_network/student.json").read_text())["network"]
    assert net["module"] == "readme_own_network:EDMNet" and net["init_args"] == {"width": 128}
    # the teacher's one step is each class's mean (near the origin: sliced W ~0.6); the student spreads onto the ring
    assert ns["student_w"] < 0.5 * ns["teacher_w"], (ns["student_w"], ns["teacher_w"])


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations: an exact denoiser of Gaussian data, written in each family's own units
# ----------------------------------------------------------------------------------------------------------------
S0 = 0.7  # data ~ N(0, S0^2 I)


def exact_x0(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(0, S0^2), x_t = alpha x0 + sigma eps."""
    a, s = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
    return a * S0**2 / (a**2 * S0**2 + s**2) * x


class GaussianEDM(nn.Module):  # raw: x_t and sigma, returns x0
    def forward(self, x, sigma):
        return exact_x0(x, torch.ones_like(sigma), sigma)


class GaussianEps(nn.Module):  # raw: x_t and the DDPM timestep, returns eps
    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t):
        assert t.min() >= 0 and t.max() <= 999
        a, s = self.schedule.alpha_sigma(t)
        return (x - a.reshape(-1, 1) * exact_x0(x, a, s)) / s.reshape(-1, 1)


class GaussianFlow(nn.Module):  # raw: x_t and t in [0, 1], returns the velocity eps - x0
    def forward(self, x, t):
        assert t.min() >= 0 and t.max() <= 1
        a, s = 1 - t, t
        x0 = exact_x0(x, a, s)
        return (x - a.reshape(-1, 1) * x0) / s.reshape(-1, 1) - x0


class GaussianF(nn.Module):  # preconditioned EDM: c_in x_t and ln(sigma)/4, returns F (D = c_skip x + c_out F)
    def forward(self, x_in, c_noise):
        sigma = (4 * c_noise).exp().reshape(-1, 1)
        x = x_in * (sigma**2 + 0.25).sqrt()
        c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        return (exact_x0(x, torch.ones_like(sigma), sigma) - c_skip * x) / c_out


@pytest.mark.parametrize("kind", ["edm", "eps", "flow", "edm_F"])
def test_every_parameterisation_gives_the_exact_x0(kind):
    from fewstep.diffusion.schedule import DDPMSchedule

    ddpm = DDPMSchedule()
    module, kw = {
        "edm": (GaussianEDM(), dict(schedule="edm", prediction="x0")),
        "eps": (GaussianEps(ddpm), dict(schedule=ddpm, prediction="eps")),
        "flow": (GaussianFlow(), dict(schedule="flow", prediction="flow")),
        "edm_F": (GaussianF(), dict(schedule="edm", prediction="edm", inputs="preconditioned")),
    }[kind]
    den = fewstep.wrap(module, sample_shape=(3,), **kw)
    sched = den.schedule
    t = sched.from_fraction(torch.tensor([0.1, 0.5, 0.9]))
    if sched.kind == "ddpm":
        t = t.round()
    x = torch.randn(3, 3)
    a, s = sched.alpha_sigma(t)
    # float32 round trips (c_in, exp(4 ln(sigma)/4), eps <-> x0): relative error ~1e-6
    torch.testing.assert_close(den(x, t), exact_x0(x, a, s), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Returns 0 and records the condition it was given."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, c):
        self.seen.append(c)
        return x * self.w


def test_conditions_index_onehot_and_embedding_with_their_nulls():
    labels = torch.tensor([0, 2])
    rec = Recorder()
    den = fewstep.wrap(rec, schedule="edm", prediction="x0", sample_shape=(2,), num_classes=3, null_class=3)
    rec.seen.clear()
    CFGDenoiser(den, 2.0)(torch.zeros(2, 2), torch.ones(2), labels)  # one batch: conditional then null
    assert rec.seen[-1].tolist() == [0, 2, 3, 3]

    den = fewstep.wrap(rec, schedule="edm", prediction="x0", sample_shape=(2,), num_classes=3, condition="onehot")
    CFGDenoiser(den, 2.0)(torch.zeros(2, 2), torch.ones(2), labels)
    assert rec.seen[-1].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]  # the zero vector is the null

    table = torch.arange(8.0).reshape(4, 2)  # 3 classes and a null row
    den = fewstep.wrap(rec, schedule="edm", prediction="x0", sample_shape=(2,), num_classes=3,
                       condition="embedding", embeddings=table)
    CFGDenoiser(den, 2.0)(torch.zeros(2, 2), torch.ones(2), labels)
    assert rec.seen[-1].tolist() == [[0, 1], [4, 5], [6, 7], [6, 7]]

    den = fewstep.wrap(rec, schedule="edm", prediction="x0", sample_shape=(2,), num_classes=3)  # no null class
    with pytest.raises(UserError, match="no null condition"):
        CFGDenoiser(den, 2.0)(torch.zeros(2, 2), torch.ones(2), labels)


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="vp", prediction="x0", sample_shape=(2,)), "schedule 'vp'"),
    (dict(schedule="edm", prediction="score", sample_shape=(2,)), "prediction 'score'"),
    (dict(schedule="edm", prediction="x0", sample_shape=(2, 2)), "sample_shape"),
    (dict(schedule="edm", prediction="x0", sample_shape=(2,), inputs="scaled"), "inputs 'scaled'"),
    (dict(schedule="edm", prediction="x0", sample_shape=(2,), condition="onehot"), "num_classes"),
    (dict(schedule="edm", prediction="x0", sample_shape=(2,), num_classes=3, condition="embedding"), "embeddings"),
    (dict(schedule="edm", prediction="x0", sample_shape=(2,), features="nope"), "no submodule 'nope'"),
    (dict(schedule="edm", prediction="x0", sample_shape=(5,)), "calling the wrapped module"),
])
def test_bad_wrap_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        fewstep.wrap(nn.Sequential(nn.Linear(2, 2)), **kwargs) if "num_classes" not in kwargs \
            else fewstep.wrap(Recorder(), **kwargs)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Distilling, saving, loading
# ----------------------------------------------------------------------------------------------------------------
class TinyEDM(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.SiLU())
        self.out = nn.Linear(width, 2)

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1)
        return x / (1 + s**2) + self.out(self.body(torch.cat([x / (1 + s), s.log()], 1)))


def points(n=512):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 0.5


def distill(teacher, tmp_path, name, **kw):
    kw = {"method": "dmd2", "steps": 1, "iterations": 2, "batch_size": 16, "evaluate_n": 0, "progress": False, **kw}
    return fewstep.distill(teacher, out=tmp_path / name, **kw)


def test_a_student_of_a_module_without_init_args_loads_into_a_fresh_module_and_the_run_has_its_report(tmp_path):
    torch.manual_seed(0)
    teacher = fewstep.wrap(TinyEDM(), schedule="edm", prediction="x0", sample_shape=(2,), features="body")
    student = distill(teacher, tmp_path, "run", data=points(), evaluate_n=100)
    rows = json.loads((tmp_path / "run" / "eval.json").read_text())  # measured against the data given
    assert [r["model"] for r in rows] == ["student", "teacher (ddim)", "teacher (heun)"]
    assert all(r["sliced_w"] > 0 for r in rows) and (tmp_path / "run" / "report.html").is_file()
    with pytest.raises(UserError, match=r"module=YourNet"):
        fewstep.load_student(tmp_path / "run")
    loaded = fewstep.load_student(tmp_path / "run", module=TinyEDM())
    assert torch.equal(loaded.sample(64, seed=3), student.sample(64, seed=3))  # the same weights, the same ops
    with pytest.raises(UserError, match="drop module="):
        fewstep.load_student(fewstep.zoo.zoo_path("grid25"), module=TinyEDM())


def test_in_memory_data_forms_and_their_errors(tmp_path):
    torch.manual_seed(0)
    teacher = fewstep.wrap(TinyEDM(), schedule="edm", prediction="x0", sample_shape=(2,), features="body")
    x = points()
    distill(teacher, tmp_path, "numpy", data=x.numpy())
    distill(teacher, tmp_path, "torch_dataset", data=torch.utils.data.TensorDataset(x))
    cfg = (tmp_path / "numpy" / "config.yaml").read_text()
    assert "teacher: <python test_wrap.TinyEDM>" in cfg and "data: <in-memory vectors (512, 2)>" in cfg
    with pytest.raises(UserError, match=r"samples of shape \(3,\) but the model makes \(2,\)"):
        distill(teacher, tmp_path, "bad", data=torch.zeros(8, 3))
    with pytest.raises(UserError, match="NaN"):
        distill(teacher, tmp_path, "nan", data=torch.full((8, 2), math.nan))
    with pytest.raises(UserError, match=r"fewstep.wrap\(module"):
        distill(TinyEDM(), tmp_path, "plain", data=x)
    cond = fewstep.wrap(Recorder(), schedule="edm", prediction="x0", sample_shape=(2,), num_classes=2)
    with pytest.raises(UserError, match=r"pass data=\(x, labels\)"):
        distill(cond, tmp_path, "nolabels", data=x)
    with pytest.raises(UserError, match=r"labels must lie in 0..1"):
        distill(cond, tmp_path, "badlabels", data=(x, torch.full((len(x),), 2)))


def test_methods_that_need_features_say_so_and_the_others_run(tmp_path):
    torch.manual_seed(0)
    teacher = fewstep.wrap(TinyEDM(), schedule="edm", prediction="x0", sample_shape=(2,))  # no features
    x = points()
    for method, iterations in (("dmd2", 2), ("lightning", 10)):  # lightning: one iteration per phase at least
        with pytest.raises(UserError, match="has no features") as e:
            distill(teacher, tmp_path, method, data=x, method=method, iterations=iterations)
        assert "\n" not in str(e.value)
    assert distill(teacher, tmp_path, "dmd2_nogan", data=x, gan=False).steps == 1
    assert distill(teacher, tmp_path, "add", data=x, method="add").steps == 1  # vectors: a random feature network


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on images in memory
# ----------------------------------------------------------------------------------------------------------------
class ImageEDM(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, sigma, labels):
        return self.w * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + (labels.float() - 0.5).reshape(-1, 1, 1, 1)


def test_evaluate_images_in_memory_with_a_feature_network_and_a_classifier():
    teacher = fewstep.wrap(ImageEDM(), schedule="edm", prediction="x0", sample_shape=(1, 4, 4), num_classes=2)
    labels = torch.arange(400) % 2
    real = (labels.float() - 0.5).reshape(-1, 1, 1, 1) + 0.1 * torch.randn(400, 1, 4, 4)
    pool = nn.Flatten()  # features: the pixels
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():  # logit of class 1 grows with the mean pixel
        classifier[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
        classifier[1].bias.zero_()
    out = fewstep.evaluate(teacher, data=(real, labels), n=200, steps=8, feature_network=pool, classifier=classifier)
    assert out["class_accuracy"] == 1.0  # every sample lies at its class's level
    assert out["fid"] >= 0 and 0 <= out["precision"] <= 1 and "sliced_w" not in out
    with pytest.raises(UserError, match="needs a feature network"):
        fewstep.evaluate(teacher, data=real, n=10)
    with pytest.raises(UserError, match="in memory"):
        fewstep.evaluate(teacher, data="digits", n=10, feature_network=pool)
