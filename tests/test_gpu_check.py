"""benchmarks/gpu_check.sh (issue 12): without a CUDA device it refuses in one line (exit 2); its dry run (--cpu)
runs the same checks' logic on the CPU and prints one table, a row per check and precision."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_without_a_gpu_it_fails_in_one_line() -> None:
    res = run()
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("gpu_check: no CUDA device")
    assert "--cpu" in res.stderr  # and says what to do instead


@pytest.fixture
def gpu_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """benchmarks/gpu_check.py loaded in this process, with no CUDA device visible and a cache of the test's own
    (main() sets both variables: monkeypatch puts them back after)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return module


def test_the_dry_run_prints_one_row_per_check(gpu_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """In this process (the script's imports are the suite's); the variables it sets are put back after."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert gpu_check.main(["--cpu", "--only", "sample,train,ddp"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| check |"):].strip().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        *[("sample", p, "ok") for p in ("float32", "bf16", "fp16")],
        *[("train", p, "ok") for p in ("float32", "bf16", "fp16")],
        ("ddp", "float32", "skipped"),
    ]
    sample_fid = [float(r[5].split("FID ")[1].split()[0].rstrip(",")) for r in rows[:3]]
    assert all(0 < f < 100 for f in sample_fid) and "x float32's" in rows[1][5]
    assert "finite losses" in rows[3][5] and "fp16 mixed precision needs a GPU" in rows[5][5]
    assert "report.html and eval.json written" in rows[3][5]


def test_a_failed_check_is_a_row_and_exit_status_1(gpu_check, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:

    def broken(*args, **kw):
        raise RuntimeError("NCCL error: unhandled system error\nsecond line")

    monkeypatch.setattr(gpu_check, "check_ddp", broken)
    assert gpu_check.main(["--cpu", "--only", "ddp"]) == 1
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| ddp | float32 | FAIL |") and "RuntimeError: NCCL error: unhandled system error (" in row
    assert "second line" not in row
