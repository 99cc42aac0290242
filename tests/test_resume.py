"""Resume never mixes runs, checkpoints protect short runs, and nothing is lost to a kill -9 (issue 11)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fewstep.config import LoopConfig
from fewstep.errors import UserError
from fewstep.methods.base import Batch, Method, Player
from fewstep.train import list_checkpoints, load_checkpoint, loop, read_metrics, train, train_teacher
from test_train import Mixture, assert_same, small_cfg, without_seconds

ROOT = Path(__file__).resolve().parents[1]


def test_resume_refuses_another_config_in_one_line_and_touches_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_teacher(small_cfg(10, checkpoint_every=3, keep_checkpoints=10), run, dataset=Mixture(256))
    for step in (9, 10):  # as if killed after the checkpoint at 6
        (run / "checkpoints" / f"step_{step:08d}.pt").unlink()
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}

    changed = small_cfg(10, checkpoint_every=3, keep_checkpoints=10, seed=1).model_copy(update={"lr": 1e-3})
    with pytest.raises(UserError) as info:
        train_teacher(changed, run, resume=True, dataset=Mixture(256))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{run} was made with a different config: ")
    assert "lr 0.003 (checkpoint) vs 0.001 (now)" in message and "loop.seed 0 (checkpoint) vs 1 (now)" in message
    assert message.endswith("resume with the same options, or pass --restart to start over")
    with pytest.raises(UserError, match=r"loop.iterations 10 \(checkpoint\) vs 8 \(now\)"):  # shorter: refused
        train_teacher(small_cfg(8, checkpoint_every=3, keep_checkpoints=10), run, resume=True, dataset=Mixture(256))
    assert {name: (run / name).read_bytes() for name in before} == before
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003.pt", "step_00000006.pt"]

    # a longer run, other logging and checkpoint settings: what SAFE_TO_CHANGE_ON_RESUME allows
    assert {"loop.log_every", "loop.checkpoint_every", "loop.checkpoint_minutes"} <= loop.SAFE_TO_CHANGE_ON_RESUME
    train_teacher(small_cfg(12, checkpoint_every=5, keep_checkpoints=10, log_every=2, checkpoint_minutes=None), run,
                  resume=True, dataset=Mixture(256))
    assert [p.name for p in list_checkpoints(run)][-2:] == ["step_00000010.pt", "step_00000012.pt"]
    assert [r["it"] for r in read_metrics(run / "metrics.jsonl")] == [3, 6, 8, 10, 12]


def test_resume_keeps_the_metrics_rows_before_the_checkpoint_byte_for_byte(tmp_path: Path) -> None:
    run, clean = tmp_path / "run", tmp_path / "clean"
    cfg = small_cfg(10, checkpoint_every=4, log_every=1, keep_checkpoints=10)
    train_teacher(cfg, clean, dataset=Mixture(256))
    train_teacher(cfg, run, dataset=Mixture(256))
    for step in (8, 10):  # killed after the checkpoint at 4, with a torn last row
        (run / "checkpoints" / f"step_{step:08d}.pt").unlink()
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    # rows as another writer may have spelt them (compact separators): kept verbatim, not re-serialised
    kept = [line.replace(b", ", b",").replace(b": ", b":") for line in lines[:4]]
    (run / "metrics.jsonl").write_bytes(b"".join(kept + lines[4:]) + b'{"it": 11, "denoiser/lo')
    inode = (run / "metrics.jsonl").stat().st_ino

    train_teacher(cfg, run, resume=True, dataset=Mixture(256))
    data = (run / "metrics.jsonl").read_bytes()
    assert data.startswith(b"".join(kept)) and (run / "metrics.jsonl").stat().st_ino == inode  # cut in place
    assert without_seconds(read_metrics(run / "metrics.jsonl")) == without_seconds(read_metrics(clean / "metrics.jsonl"))


class Clocked(Method):
    """A linear fit whose every update takes 25 s on a fake clock; it can crash at one iteration."""

    def __init__(self, clock: list[float], crash_at: int | None = None) -> None:
        torch.manual_seed(0)
        net = nn.Linear(2, 2)
        self.players = {"net": Player(net, torch.optim.Adam(net.parameters(), lr=0.01))}
        self.clock, self.crash_at = clock, crash_at

    def loss(self, player: str, batch: Batch, it: int):
        if it == self.crash_at:
            raise RuntimeError("simulated crash")
        self.clock[0] += 25.0
        out = self.players[player].module(batch.x0 + 0.1 * torch.randn_like(batch.x0))
        return ((out - batch.x0.flip(1)) ** 2).mean(), {}


def test_wall_time_checkpoints_land_between_the_periodic_ones_and_resume_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(loop, "_now", lambda: clock[0])
    cfg = LoopConfig(iterations=10, batch_size=16, checkpoint_every=4, checkpoint_minutes=1.0, keep_checkpoints=10,
                     log_every=1, sample_every=0, progress=False)
    train(Clocked(clock), Mixture(64), cfg, tmp_path / "whole")
    # 25 s an update, a checkpoint once 60 s have passed since the last one, and every 4th iteration, and the last
    steps = [int(load_checkpoint(p)["iteration"]) for p in list_checkpoints(tmp_path / "whole")]
    assert steps == [3, 4, 7, 8, 10]

    clock[0] = 0.0
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Clocked(clock, crash_at=7), Mixture(64), cfg, tmp_path / "broken")
    assert [p.name for p in list_checkpoints(tmp_path / "broken")][-1] == "step_00000007.pt"  # a wall-time one
    train(Clocked(clock), Mixture(64), cfg, tmp_path / "broken", resume=True)
    for name in ("step_00000008.pt", "step_00000010.pt"):
        assert_same(load_checkpoint(tmp_path / "broken" / "checkpoints" / name),
                    load_checkpoint(tmp_path / "whole" / "checkpoints" / name), name)


def _fewstep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewstep.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _messages(stderr: str) -> list[str]:
    """stderr without the progress bar's lines."""
    return [line for line in stderr.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]


def test_cli_resume_uses_the_runs_config_warns_once_and_restart_moves_it_aside(tmp_path: Path) -> None:
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump({"data": "grid25", "network": {"type": "mlp", "width": 16, "depth": 1},
                                      "loop": {"iterations": 4, "batch_size": 16, "log_every": 1, "sample_every": 0,
                                               "progress": False}}))
    run = tmp_path / "run"
    done = _fewstep("teacher", "train", "--config", str(config), "--out", str(run), "--checkpoint-every", "2")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt", "step_00000004.pt"]

    # no --config: the run's own config.yaml (not the grid25 preset), the options on top; the newest checkpoint is
    # truncated, so the one before is used, with one warning line
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    before = (run / "metrics.jsonl").read_bytes()
    resumed = _fewstep("teacher", "train", "--out", str(run), "--resume", "--iterations", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert _messages(resumed.stderr) == [f"fewstep: warning: skipping checkpoint {newest}: it is truncated or damaged "
                                         "(not a complete zip archive); trying the one before"]
    assert yaml.safe_load((run / "config.yaml").read_text())["network"]["width"] == 16
    assert (run / "metrics.jsonl").read_bytes().startswith(before.splitlines(keepends=True)[0])
    assert [r["it"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    refused = _fewstep("teacher", "train", "--out", str(run), "--resume", "--iterations", "5", "--seed", "2")
    assert refused.returncode == 2 and _messages(refused.stderr) == [
        f"fewstep: error: {run} was made with a different config: loop.seed 0 (checkpoint) vs 2 (now); resume "
        "with the same options, or pass --restart to start over"]

    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = _fewstep("teacher", "train", "--config", str(config), "--out", str(run), "--restart")
    assert again.returncode == 0, again.stderr
    (moved,) = tmp_path.glob("run.before-restart-*")
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == kept
    assert any(f"moved the earlier run in {run} to {moved}" in line for line in _messages(again.stderr))
    assert [r["it"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_kill_minus_9_at_five_moments_resumes_bit_for_bit(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.kill_resume import kill_resume

    result = kill_resume(kills=5, seed=0, workdir=tmp_path)
    assert result["kills"] == 5 and result["kills_during_checkpoint_write"] >= 1, result
    assert result["resumes_bit_exact"] == result["resumes"] == 5, result
    assert result["final_weights_bit_exact"] and result["files_lost"] == 0, result
