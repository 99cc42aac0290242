"""A run's report measures the teacher once (issue 15): its rows are cached by what decides them -- the teacher's
weights and description, the sampler and steps, n, seed, guidance, the data and the feature network, and
``TEACHER_EVAL_VERSION`` -- so the second report with the same teacher samples only the student, and any change in
one of those parts measures the teacher again.

The teacher is the shipped ``ring8`` (2-D points: sliced Wasserstein and mode coverage, fast to measure); the student
is the teacher itself behind a 1- or 2-step student sampler (what is measured does not matter here, only whether).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import fewstep.api
from fewstep import report
from fewstep.api import load_teacher
from fewstep.diffusion.samplers import student_timesteps
from fewstep.student import Student


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, and ``fewstep.api.evaluate`` recording what it measures; the teacher's curve is
    only the table's two rows here (test_report_html checks the curve's rows are cached the same way)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(report, "TEACHER_CURVE", {"heun": (32,)})
    return tmp_path / "xdg" / "fewstep" / "eval"


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    calls: list[tuple[str, dict]] = []
    real = fewstep.api.evaluate

    def evaluate(model, **kw):
        calls.append(("student" if isinstance(model, Student) else "teacher", kw))
        return real(model, **kw)

    monkeypatch.setattr(fewstep.api, "evaluate", evaluate)
    return calls


@pytest.fixture(scope="module")
def ring8() -> torch.nn.Module:
    return load_teacher("ring8")


def student_of(teacher: torch.nn.Module, steps: int = 1) -> Student:
    return Student(teacher, student_timesteps(teacher.schedule, steps))


def report_rows(run: Path, teacher: torch.nn.Module, steps: int = 1, n: int = 200, seed: int = 0) -> list[dict]:
    report.write_run_report(run, student_of(teacher, steps), teacher, n=n, seed=seed, data="ring8")
    return json.loads((run / "eval.json").read_text())


def teacher_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "cached"} for r in rows[1:]]


def test_a_second_report_reads_the_teachers_rows_from_the_cache(tmp_path: Path, cache: Path, measured: list,
                                                                 ring8: torch.nn.Module) -> None:
    first = report_rows(tmp_path / "a", ring8)
    assert [who for who, _ in measured] == ["student", "teacher", "teacher"]
    assert len(list(cache.glob("teacher_*.json"))) == 2 and not any("cached" in r for r in first)
    assert "from the cache" not in (tmp_path / "a" / "report.html").read_text()

    measured.clear()
    second = report_rows(tmp_path / "b", ring8)
    assert [who for who, _ in measured] == ["student"]
    assert teacher_rows(second) == teacher_rows(first)  # every number, timing included: the row as measured then
    assert all(r["cached"].endswith(" UTC") for r in second[1:])
    html = (tmp_path / "b" / "report.html").read_text()
    assert f"Teacher rows from the cache, measured {second[1]['cached']}" in html and str(cache) in html

    # what is cached is what measuring gives: an empty cache measures the same numbers again
    for p in cache.iterdir():
        p.unlink()
    measured.clear()
    third = report_rows(tmp_path / "c", ring8)
    assert [who for who, _ in measured] == ["student", "teacher", "teacher"]
    numbers = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_1000"} for r in rows]  # noqa: E731
    assert numbers(teacher_rows(third)) == numbers(teacher_rows(first))


def perturbed(teacher: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight, a little
    return other


@pytest.mark.parametrize("change, remeasured", [
    ("weights", ["teacher (ddim)", "teacher (heun)"]),
    ("n", ["teacher (ddim)", "teacher (heun)"]),
    ("seed", ["teacher (ddim)", "teacher (heun)"]),
    ("student steps", ["teacher (ddim)"]),  # the DDIM row samples at the student's steps; Heun 32 is the same row
    ("version", ["teacher (ddim)", "teacher (heun)"]),
])
def test_a_change_in_any_part_of_the_key_measures_the_teacher_again(tmp_path: Path, cache: Path, measured: list,
                                                                    ring8: torch.nn.Module,
                                                                    monkeypatch: pytest.MonkeyPatch, change: str,
                                                                    remeasured: list[str]) -> None:
    report_rows(tmp_path / "a", ring8, n=100)
    measured.clear()
    teacher, kw = ring8, {"n": 100}
    if change == "weights":
        teacher = perturbed(ring8)
    elif change == "n":
        kw["n"] = 120
    elif change == "seed":
        kw["seed"] = 1
    elif change == "student steps":
        kw["steps"] = 2
    else:
        monkeypatch.setattr(report, "TEACHER_EVAL_VERSION", report.TEACHER_EVAL_VERSION + 1)
    rows = report_rows(tmp_path / "b", teacher, **kw)
    assert [who for who, _ in measured] == ["student"] + ["teacher"] * len(remeasured)
    assert [r["model"] for r in rows[1:] if "cached" not in r] == remeasured
    assert len(list(cache.glob("teacher_*.json"))) == 2 + len(remeasured)


def test_a_damaged_or_unwritable_cache_never_fails_the_report(tmp_path: Path, cache: Path, measured: list,
                                                               ring8: torch.nn.Module,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = report_rows(tmp_path / "a", ring8, n=100)
    for p in cache.iterdir():
        p.write_text('{"format": "fewstep-teacher-eval", "row": ')  # torn
    measured.clear()
    second = report_rows(tmp_path / "b", ring8, n=100)
    assert [who for who, _ in measured] == ["student", "teacher", "teacher"]  # measured again, and cached again
    assert all(json.loads(p.read_text())["row"] for p in cache.iterdir())
    assert [r["sliced_w"] for r in second[1:]] == [r["sliced_w"] for r in first[1:]]

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # the cache cannot be made: a warning, and the report
    with pytest.warns(UserWarning, match="the teacher's rows are not cached"):
        report_rows(tmp_path / "c", ring8, n=100)
    assert (tmp_path / "c" / "report.html").is_file()


def test_a_diffusers_folder_is_fingerprinted_by_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights by size and modification time (no multi-GB read per report), configs and small files by content."""
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / ".git").mkdir()
    weights, config = folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet" / "config.json"
    weights.write_bytes(b"w" * 1000)
    config.write_text('{"sample_size": 8}')

    class Teacher(torch.nn.Module):
        components = type("Components", (), {"folder": folder})()

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(report, "HASH_WHOLE_BYTES", 100)  # the weights file counts as large
    ids = [report._weights_id(Teacher())]
    (folder / ".git" / "index").write_text("not part of the model")
    ids.append(report._weights_id(Teacher()))
    assert ids[1] == ids[0]
    config.write_text('{"sample_size": 16}')  # same size, other content
    ids.append(report._weights_id(Teacher()))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the weights file replaced
    ids.append(report._weights_id(Teacher()))
    assert len(set(ids[1:])) == 3
    half = Teacher().to(torch.float16)
    assert report._weights_id(half) not in ids  # loaded in another dtype
    assert report._weights_id(Teacher()) == ids[-1]  # nothing changed: the same fingerprint
