"""A run's report can be shared alone (issue 12): it parses as HTML (every element closed, in order), every picture
is embedded as a data URI (no src or href to a local file or the network), and the pictures beside it can be deleted
without the page losing one. Its quality-against-NFE section draws the teacher's curve per sampler with the student
as a point, from rows measured once (the table's teacher rows are points of the curve, and a second report reads all
of them from the cache).

The teacher is the shipped ``ring8`` (2-D points: fast to measure); the student is the teacher behind a 1-step
student sampler, as in test_report_cache.
"""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import fewstep.api
from fewstep import report
from fewstep.api import load_teacher
from fewstep.diffusion.samplers import student_timesteps
from fewstep.eval.images import save_points
from fewstep.student import Student

#: elements that have no end tag (HTML Living Standard, "void elements")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Records what makes a page depend on anything outside it, and whether its elements nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[bytes] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.errors.append(f"<{tag}> element")
        for name, value in attrs:
            value = (value or "").strip()
            if name in ("src", "href", "srcset", "poster", "action", "data") and not value.startswith("data:"):
                self.errors.append(f"{name}={value[:60]!r} on <{tag}>")
            if "url(" in value or value.lower().startswith(("http:", "https:", "//", "file:")):
                self.errors.append(f"{name}={value[:60]!r} on <{tag}> reaches outside the page")
            if tag == "img" and name == "src" and value.startswith("data:"):
                head, _, payload = value.partition(",")
                assert head.endswith(";base64"), head
                self.images.append(base64.b64decode(payload, validate=True))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"</{tag}> closes a void element")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "style" and ("url(" in data or "@import" in data):
            self.errors.append("the stylesheet loads something")


def assert_self_contained(path: Path) -> list[bytes]:
    """Parse the report at ``path``; fail on anything it needs from outside it or on a misnested element; return
    the embedded pictures' bytes (each one opened with Pillow)."""
    from PIL import Image

    text = path.read_text(encoding="utf-8")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert text.lstrip().lower().startswith("<!doctype html>")
    assert not checker.errors, checker.errors
    assert not checker.stack, f"unclosed: {checker.stack}"
    for data in checker.images:
        Image.open(io.BytesIO(data)).verify()  # a real picture, not a file name
    return checker.images


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    for bad in ['<img src="samples/a.png">', '<a href="https://example.org">x</a>', "<p><b>x</p></b>", "<div>",
                '<script src="x.js"></script>', '<p style="background:url(a.png)">x</p>']:
        page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{bad}</body></html>")
        with pytest.raises(AssertionError):
            assert_self_contained(page)


@pytest.fixture
def measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A cache of this test's own, and who ``fewstep.api.evaluate`` measures."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    calls: list[str] = []
    real = fewstep.api.evaluate

    def evaluate(model, **kw):
        calls.append("student" if isinstance(model, Student) else f"{kw['sampler']} {kw['steps']}")
        return real(model, **kw)

    monkeypatch.setattr(fewstep.api, "evaluate", evaluate)
    return calls


def a_run(run: Path, teacher: torch.nn.Module) -> None:
    """What a finished run leaves for its report: metrics.jsonl and a sample grid over training."""
    run.mkdir()
    rows = [{"it": i, "generator/loss": 1.0 / i, "guidance/loss": 2.0 / i} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    x, _ = fewstep.api.sample(teacher, 64, steps=2)
    save_points(x, run / "samples" / "step_00000005.png")
    (run / "config.yaml").write_text("method: dmd2\nteacher: ring8\ndata: ring8\n")


def test_a_run_report_stands_alone_and_draws_the_student_on_the_teachers_curve(tmp_path: Path,
                                                                                 measured: list[str]) -> None:
    teacher = load_teacher("ring8")
    student = Student(teacher, student_timesteps(teacher.schedule, 1))
    run = tmp_path / "run"
    a_run(run, teacher)
    path = report.write_run_report(run, student, teacher, n=100, data="ring8")

    settings = sorted({(s, k) for s, ks in report.TEACHER_CURVE.items() for k in ks} | {("ddim", 1)})
    assert sorted(measured[1:]) == sorted(f"{s} {k}" for s, k in settings) and measured[0] == "student"
    # the table's rows are points of the curve: measured once
    evals = {r["model"]: r for r in json.loads((run / "eval.json").read_text())}
    curve = json.loads((run / "nfe_curve.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in curve] == [*settings, ("student", 1)]
    assert [r["nfe"] for r in curve if r["sampler"] == "heun"] == [2 * k - 1 for s, k in settings if s == "heun"]
    assert curve[-1]["nfe"] == 1 and curve[-1]["sliced_w"] == evals["student"]["sliced_w"]
    assert next(r for r in curve if (r["sampler"], r["steps"]) == ("heun", 32)) == evals["teacher (heun)"]

    pictures = assert_self_contained(path)
    # two loss curves, the NFE picture and the grid over training, each embedded with the bytes written beside it
    beside = [run / "curves" / "generator_loss.png", run / "curves" / "guidance_loss.png", run / "nfe_curve.png",
              run / "samples" / "step_00000005.png"]
    assert sorted(pictures) == sorted(p.read_bytes() for p in beside)
    text = path.read_text()
    assert "sliced_w against NFE" in text and "<td>student</td>" in text
    # sent alone: the pictures beside it deleted, the page is the same page
    for p in beside:
        p.unlink()
    alone = tmp_path / "sent" / "report.html"
    alone.parent.mkdir()
    alone.write_text(text)
    assert len(assert_self_contained(alone)) == len(beside)

    # a second report reads every teacher row, the curve's included, from the cache
    measured.clear()
    second = tmp_path / "second"
    a_run(second, teacher)
    report.write_run_report(second, student, teacher, n=100, data="ring8")
    assert measured == ["student"]
    again = json.loads((second / "nfe_curve.json").read_text())
    assert [{k: v for k, v in r.items() if k != "cached"} for r in again[:-1]] == curve[:-1]


def test_a_missing_picture_is_said_not_linked(tmp_path: Path) -> None:
    from fewstep.eval.report import write_report

    path = write_report(tmp_path / "r.html", "t", [{"heading": "h", "images": [("gone", "samples/none.png")]}])
    assert not assert_self_contained(path) and "gone: no picture (samples/none.png)" in path.read_text()
