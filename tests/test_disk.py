"""The disk is checked before a checkpoint is written (issue 15): a run that cannot write one stops in its first second,
one that fills the disk stops in one line with its last checkpoint intact, and ``--resume`` then continues exactly.

The disk is faked by replacing ``shutil.disk_usage`` (what :func:`fewstep.io.free_bytes` asks): plenty of room until
the run directory holds a given number of checkpoints, then 1 MB, less than the 64 MB margin a write leaves free.
"""
from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from fewstep.errors import UserError
from fewstep.io import DISK_MARGIN_BYTES, show_bytes, tensor_bytes, with_margin
from fewstep.train import list_checkpoints, load_checkpoint, loop, read_metrics, train_teacher
from test_train import Mixture, assert_same, small_cfg, without_seconds

Usage = namedtuple("Usage", "total used free")
PLENTY, LITTLE = 10**12, 10**6


def fake_disk(monkeypatch: pytest.MonkeyPatch, run: Path, room_for: int | None) -> None:
    """``shutil.disk_usage``: plenty free while ``run`` holds fewer than ``room_for`` checkpoints, then 1 MB (None:
    always plenty)."""
    def usage(path: str | Path) -> Usage:
        full = room_for is not None and len(list_checkpoints(run)) >= room_for
        free = LITTLE if full else PLENTY
        return Usage(PLENTY, PLENTY - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob(".*"))


def test_a_full_disk_stops_the_run_in_one_line_and_resume_continues_exactly(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clean, run = tmp_path / "clean", tmp_path / "run"
    cfg = small_cfg(40)  # checkpoints at 10, 20, 30, 40; 3 kept
    train_teacher(cfg, clean, dataset=Mixture(512))

    fake_disk(monkeypatch, run, room_for=2)
    with pytest.raises(UserError) as info:
        train_teacher(cfg, run, dataset=Mixture(512))
    message = str(info.value)
    assert "\n" not in message
    folder = run / "checkpoints"
    assert message.startswith(f"not enough disk space for checkpoint step_00000030.pt in {folder}: it needs ")
    assert f"and {show_bytes(LITTLE)} are free" in message
    assert "free some space there, lower loop.keep_checkpoints (3 now" in message
    assert "move the run folder to a disk with room" in message
    assert message.endswith("the last checkpoint, step_00000020.pt, is intact and --resume continues from it")
    # nothing half-written; the checkpoints before are those of the uninterrupted run
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010.pt", "step_00000020.pt"]
    assert leftovers(run) == []
    assert_same(load_checkpoint(folder / "step_00000020.pt"), load_checkpoint(clean / "checkpoints" /
                                                                              "step_00000020.pt"))
    assert not (run / "model.safetensors").exists()

    # the same config resumed on a disk with room (space freed) ends where the uninterrupted run ended
    monkeypatch.undo()
    train_teacher(cfg, run, resume=True, dataset=Mixture(512))
    for name in ("step_00000030.pt", "step_00000040.pt"):
        assert_same(load_checkpoint(folder / name), load_checkpoint(clean / "checkpoints" / name), name)
    assert without_seconds(read_metrics(run / "metrics.jsonl")) == without_seconds(read_metrics(clean /
                                                                                                "metrics.jsonl"))
    assert (run / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()


def test_lowering_keep_checkpoints_on_resume_frees_the_room_at_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clean, run = tmp_path / "clean", tmp_path / "run"
    train_teacher(small_cfg(40, checkpoint_every=5), clean, dataset=Mixture(512))
    fake_disk(monkeypatch, run, room_for=3)  # the disk holds 3 checkpoints: the 3 kept plus one being written fail
    with pytest.raises(UserError, match="checkpoint step_00000020.pt in .*the last checkpoint, step_00000015.pt"):
        train_teacher(small_cfg(40, checkpoint_every=5), run, dataset=Mixture(512))
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:08d}.pt" for s in (5, 10, 15)]

    # keep_checkpoints 1 (a resume may change it): the resumed run removes the two older ones before training, so the
    # same disk takes each new checkpoint (written, then its predecessor removed)
    fake_disk(monkeypatch, run, room_for=2)
    train_teacher(small_cfg(40, checkpoint_every=5, keep_checkpoints=1), run, resume=True, dataset=Mixture(512))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000040.pt"]
    assert_same(load_checkpoint(run / "checkpoints" / "step_00000040.pt")["players"],
                load_checkpoint(clean / "checkpoints" / "step_00000040.pt")["players"])
    assert (run / "model.safetensors").read_bytes() == (clean / "model.safetensors").read_bytes()


def test_a_run_without_room_for_one_checkpoint_stops_before_training(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    fake_disk(monkeypatch, run, room_for=0)
    trained = []
    monkeypatch.setattr(loop, "_train_step", lambda *a: trained.append(a))
    with pytest.raises(UserError) as info:
        train_teacher(small_cfg(40), run, dataset=Mixture(512))
    message = str(info.value)
    assert "\n" not in message and not trained
    assert message.startswith(f"{run / 'checkpoints'} has {show_bytes(LITTLE)} free, too little for one checkpoint "
                              "of this run (about ")
    assert "nothing was trained; free some space there or choose another --out" in message
    assert not run.exists()


def test_room_for_one_checkpoint_but_not_the_kept_ones_is_a_warning(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    sizes: list[int] = []
    estimate = loop._checkpoint_bytes
    monkeypatch.setattr(loop, "_checkpoint_bytes", lambda r: sizes.append(estimate(r)) or sizes[-1])

    def usage(path: str | Path) -> Usage:  # room for one checkpoint (as first estimated), less what is written
        written = sum(p.stat().st_size for p in list_checkpoints(run))
        return Usage(PLENTY, 0, with_margin(sizes[0]) + 10_000 - written)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.warns(UserWarning, match=r"less than the .* that the 4 checkpoints of about .* this run holds at once "
                                         r"need \(it keeps the newest 3 and writes each new one before removing"):
        with pytest.raises(UserError, match="checkpoint step_00000020.pt"):
            train_teacher(small_cfg(40), run, dataset=Mixture(512))  # 10 is written; 20 needs 10's room again
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010.pt"]


def test_the_estimate_bounds_the_checkpoint_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before training the estimate counts AdamW's two moments that do not exist yet; it then holds the file within
    the margin. It misses only the RNG states and AdamW's step counters (a few kB), which the margin covers."""
    run = tmp_path / "run"
    sizes: list[int] = []
    estimate = loop._checkpoint_bytes
    monkeypatch.setattr(loop, "_checkpoint_bytes", lambda r: sizes.append(estimate(r)) or sizes[-1])
    cfg = small_cfg(20).model_copy(update={"network": {"type": "mlp", "width": 256, "depth": 3}})
    train_teacher(cfg, run, dataset=Mixture(512))
    assert len(sizes) == 3  # the start-up check, then before each of the two checkpoints
    for path in list_checkpoints(run):
        stored = tensor_bytes(load_checkpoint(path))
        assert 0 <= stored - sizes[0] <= 16_000, (stored, sizes[0])  # tensors: the start-up estimate and a few kB
        assert path.stat().st_size - sizes[0] <= 100_000  # and torch.save's records and pickles (60 kB here)
    assert sizes[1] == sizes[2] and abs(sizes[1] - sizes[0]) <= 1_000  # after the first update: the moments exist
    assert DISK_MARGIN_BYTES > 100 * 100_000  # the margin covers what the estimate misses 100 times over


DISK_UNDER_DDP = """
import json, shutil, sys
sys.path.insert(0, __TESTS__)
from collections import namedtuple
import torch
torch.set_num_threads(1)
from accelerate import PartialState
state = PartialState(cpu=True)
from fewstep.errors import UserError
from fewstep.train import list_checkpoints, train_teacher
from test_train import Mixture, small_cfg

run = sys.argv[1]
if state.is_main_process:  # only the main process writes and checks; the other must stop with it
    Usage = namedtuple("Usage", "total used free")
    shutil.disk_usage = lambda p: Usage(1, 0, 10**6 if len(list_checkpoints(run)) >= 1 else 10**12)
try:
    train_teacher(small_cfg(30, batch_size=32), run, dataset=Mixture(256))
    outcome = "finished"
except UserError as e:
    outcome = str(e)
with open(f"{run}.rank{state.process_index}.json", "w") as f:
    json.dump(outcome, f)
"""


def test_every_process_stops_together_under_ddp(tmp_path: Path) -> None:
    from test_distributed import launch

    script = tmp_path / "disk_ddp.py"
    script.write_text(DISK_UNDER_DDP.replace("__TESTS__", repr(str(Path(__file__).parent))))
    run = tmp_path / "run"
    launch(script, str(run), timeout=180)  # a process left waiting for the other would time out here
    outcomes = [json.loads(Path(f"{run}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("not enough disk space for checkpoint step_00000020.pt")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010.pt"] and leftovers(run) == []


def test_fewstep_distill_on_a_full_disk_exits_2_with_one_line_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fewstep.cli import main

    run = tmp_path / "run"
    argv = ["distill", "--teacher", "ring8", "--iterations", "4", "--checkpoint-every", "2", "--batch-size", "16",
            "--out", str(run)]
    fake_disk(monkeypatch, run, room_for=1)
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line[line.index("fewstep: error: "):] for line in err.splitlines() if "fewstep: error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("fewstep: error: not enough disk space for checkpoint step_00000004.pt in ")
    assert errors[0].endswith("the last checkpoint, step_00000002.pt, is intact and --resume continues from it")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt"] and leftovers(run) == []
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert (run / "student.safetensors").is_file() and (run / "report.html").is_file()
