"""The command line: bad input is one line on stderr and exit status 2; the happy paths write what they say."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("fewstep: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_dataset(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("teacher", "train", "--data", "mnist", "--out", str(tmp_path / "r")), "mnist")


def test_unknown_teacher(tmp_path: Path) -> None:
    proc = run_cli("teacher", "sample", "--teacher", "sdxl", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(proc, "sdxl", "digits")


def test_unknown_sampler(tmp_path: Path) -> None:
    proc = run_cli("teacher", "sample", "--teacher", "grid25", "--sampler", "dpm", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(proc, "dpm", "heun")


@pytest.mark.parametrize("steps", ["0", "-3", "two"])
def test_bad_step_count(tmp_path: Path, steps: str) -> None:
    proc = run_cli("teacher", "sample", "--teacher", "grid25", "--steps", steps, "--out", str(tmp_path / "g.png"))
    assert_one_line_error(proc, "--steps")


def test_existing_out_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "g.png"
    existing.write_bytes(b"earlier result")
    assert_one_line_error(run_cli("teacher", "sample", "--teacher", "grid25", "--out", str(existing)), "exists")
    assert existing.read_bytes() == b"earlier result"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert_one_line_error(run_cli("teacher", "train", "--data", "grid25", "--out", str(run_dir)), "exists", "--resume")
    assert (run_dir / "metrics.jsonl").read_text() == "{}\n"


def test_missing_subcommand_is_one_line() -> None:
    assert_one_line_error(run_cli("teacher"))


def test_teacher_sample_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "grid.png"
    assert main(["teacher", "sample", "--teacher", "digits", "--steps", "2", "--n", "20", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.width >= 8 * 5 and im.height >= 8 * 2  # a grid of upscaled 8x8 digits
    assert "NFE 3" in capsys.readouterr().out  # heun, 2 steps: 2n - 1 evaluations


def test_eval_json(capsys: pytest.CaptureFixture) -> None:
    code = main(["eval", "--model", "grid25", "--steps", "4", "--sampler", "ddim", "--n", "500", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("fid", "precision", "recall", "class_accuracy", "nfe", "seconds_per_1000"):
        assert key in result
    assert result["nfe"] == 4
    assert result["seconds_per_1000"] > 0
    assert result["sliced_w"] > 0 and 0 <= result["modes_covered"] <= 25


def test_eval_digits_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--model", "digits", "--steps", "8", "--sampler", "ddim", "--n", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["class_accuracy"] > 0.5  # the shipped teacher draws the digit it is asked for


def test_distill_sample_eval_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["distill", "--method", "dmd2", "--teacher", "grid25", "--iterations", "4", "--batch-size", "32",
                 "--out", str(run)]) == 0
    for name in ("config.yaml", "metrics.jsonl", "student.safetensors", "student.json", "eval.json", "report.html"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step_*.pt")) and list((run / "samples").glob("step_*.png"))
    assert main(["sample", "--student", str(run), "--n", "50", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--n", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 1 and result["steps"] == 1
    # a student samples in its own step count: asking for another is a clear error
    proc = run_cli("eval", "--model", str(run), "--steps", "4")
    assert_one_line_error(proc, "1 steps")
    # the run directory is never overwritten
    assert_one_line_error(run_cli("distill", "--teacher", "grid25", "--out", str(run)), "exists")


def test_distill_bad_method(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("distill", "--method", "gan", "--out", str(tmp_path / "r")), "gan", "dmd2")


def test_demo_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--n", "100", "--distill-iterations", "3"]) == 0
    report = tmp_path / "runs" / "demo" / "report.html"
    text = report.read_text()
    assert "DMD2 student" in text and "teacher" in text
    rows = json.loads((tmp_path / "runs" / "demo" / "metrics.json").read_text())
    assert [r["nfe"] for r in rows if r["model"] == "teacher"] == [1, 2, 4, 8, 31, 63]
    # a second demo never overwrites the first
    assert main(["demo", "--n", "100", "--distill-iterations", "3"]) == 0
    assert (tmp_path / "runs" / "demo-1" / "report.html").is_file() and report.read_text() == text


def test_inception_fid_names_the_missing_weights(tmp_path: Path) -> None:
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    proc = run_cli("eval", "--model", "digits", "--n", "20", "--steps", "1", "--inception-weights", str(missing))
    assert_one_line_error(proc, "pt_inception-2015-12-05-6726825d.pth")
