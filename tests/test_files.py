"""Files a user hands fewstep, and files fewstep writes: a damaged or foreign model file, an unwritable or full
output place, a picture format, and a run on a real (diffusers) teacher that must finish with its report.

Each bad case is one line on stderr (``fewstep: error: ...``, no traceback) naming the file and the fix, with exit
status 2, and nothing outside the test's scratch folder is created or changed (the fixtures, the shipped weights and
the repository's top level are compared before and after every test). Most cases call ``fewstep.cli.main`` in the
test process; a few run the real command as a process.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_tiny
import fewstep
import fewstep.io as fio
from fewstep import UserError
from fewstep.cli import main

REPO = Path(__file__).resolve().parent.parent
ZOO = REPO / "fewstep" / "zoo"


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: two finished student runs, damaged and mixed-up copies of their files, diffusers folders
# ------------------------------------------------------------------------------------------------------------------
def _copy_pair(src: Path, dst: Path, name: str) -> None:
    dst.mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(src.with_suffix(suffix), dst / f"{name}{suffix}")


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("files")
    fewstep.distill("ring8", out=root / "ring8_run", iterations=1, batch_size=8, evaluate_n=0)
    fewstep.distill("digits", out=root / "digits_run", iterations=1, batch_size=4, evaluate_n=0)
    ring8 = root / "ring8_run" / "student"
    weights = ring8.with_suffix(".safetensors").read_bytes()

    def damaged(name: str, data: bytes, json_text: str | None = None) -> None:
        (root / name).mkdir()
        (root / name / "student.json").write_text(json_text or ring8.with_suffix(".json").read_text())
        (root / name / "student.safetensors").write_bytes(data)

    damaged("trunc", weights[:100])
    damaged("garbage", np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    damaged("foreign", (root / "digits_run" / "student.safetensors").read_bytes())  # a real file of another net
    damaged("notjson", weights, "[1, 2]")
    shutil.copytree(root / "ring8_run", root / "no_json")
    (root / "no_json" / "student.json").unlink()
    _copy_pair(ZOO / "ring8", root / "teacher_no_json", "model")
    (root / "teacher_no_json" / "model.json").unlink()
    damaged("badjson", weights, '{"format": "fewstep-denoiser", ')
    state = load_file(ring8.with_suffix(".safetensors"))
    key = sorted(state)[0]
    state[key] = torch.zeros(*(s + 1 for s in state[key].shape))  # same keys, one shape off
    (root / "shape").mkdir()
    shutil.copy(ring8.with_suffix(".json"), root / "shape" / "student.json")
    save_file(state, root / "shape" / "student.safetensors")
    _copy_pair(ZOO / "ring8", root / "teacher_as_student", "student")  # a teacher's json where a student's goes
    _copy_pair(ring8, root / "student_as_teacher", "model")  # and the other way round
    _copy_pair(ZOO / "ring8", root / "teacher_trunc", "model")
    (root / "teacher_trunc" / "model.safetensors").write_bytes((ZOO / "ring8.safetensors").read_bytes()[:3000])

    hf_tiny.unet2d(folder=root / "pipe")
    shutil.copytree(root / "pipe", root / "no_index")
    (root / "no_index" / "model_index.json").unlink()
    shutil.copytree(root / "pipe", root / "bad_unet")
    (root / "bad_unet" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 2000)
    return root


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts:
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def scratch(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every test runs in its own scratch folder; the fixtures, the shipped weights and the repository's top level
    are the same afterwards."""
    folders = [ZOO] + ([request.getfixturevalue("fx")] if "fx" in request.fixturenames else [])
    before, top = _snapshot(*folders), sorted(os.listdir(REPO))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert _snapshot(*folders) == before, "a fixture or a shipped file changed"
    assert sorted(os.listdir(REPO)) == top, "something was created in the repository"


def _one_line(capsys: pytest.CaptureFixture, argv: list[str], *needles: str, status: int = 2) -> str:
    """Run ``fewstep ARGV`` in this process; its stderr must be exactly one ``fewstep: error:`` line."""
    assert _main(argv) == status
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fewstep: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _main(argv: list[str]) -> int:
    """``main``'s exit status, usage errors (argparse exits) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _last_line(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    """A run that fails mid-way: its progress bar may be on stderr, but the error is one line at the end."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "fewstep: error:" in line]
    assert len(errors) == 1, err
    line = errors[0][errors[0].index("fewstep: error:"):]
    for needle in needles:
        assert needle in line, line
    return line


def _no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if ".tmp" in p.name]
    assert not left, left


# ------------------------------------------------------------------------------------------------------------------
# 3. Damaged or foreign model files: one line naming the file and the fix, at every loading entry point
# ------------------------------------------------------------------------------------------------------------------
LOAD_CASES = [
    (["sample", "--student", "{fx}/trunc", "--out", "o.png"], ["trunc/student.safetensors", "truncated or damaged"]),
    (["eval", "--model", "{fx}/garbage", "--n", "10"], ["garbage/student.safetensors", "not a readable safetensors"]),
    (["eval", "--model", "{fx}/trunc/student.safetensors", "--n", "10"], ["trunc/student.safetensors", "truncated"]),
    (["export", "--student", "{fx}/trunc", "--out", "e"], ["trunc/student.safetensors", "truncated"]),
    (["sample", "--student", "{fx}/foreign", "--out", "o.png"],
     ["foreign/student.safetensors", "another network", "Missing key(s)", "same model"]),
    (["sample", "--student", "{fx}/shape/student.json", "--out", "o.png"],
     ["shape/student.safetensors", "size mismatch for"]),
    (["sample", "--student", "{fx}/notjson", "--out", "o.png"],
     ["notjson/student.json", "not a fewstep denoiser description"]),
    (["eval", "--model", "{fx}/badjson", "--n", "10"], ["badjson/student.json", "not readable JSON"]),
    (["sample", "--student", "{fx}/teacher_as_student", "--out", "o.png"],
     ["teacher_as_student/student.json", "not a distilled student", "--teacher"]),
    (["export", "--student", "{fx}/teacher_as_student", "--out", "e"],
     ["teacher_as_student/student.json", "not a distilled student"]),
    (["teacher", "sample", "--teacher", "{fx}/student_as_teacher", "--out", "o.png"],
     ["student_as_teacher/model.json", "is a distilled student", "fewstep sample --student"]),
    (["distill", "--teacher", "{fx}/ring8_run/student.json", "--out", "r"], ["student.json", "distilled student"]),
    (["distill", "--teacher", "{fx}/ring8_run", "--out", "r"], ["ring8_run", "distillation run"]),
    (["eval", "--model", "{fx}/teacher_trunc", "--n", "10"], ["teacher_trunc/model.safetensors", "truncated"]),
    (["teacher", "sample", "--teacher", "{fx}/teacher_trunc/model.safetensors", "--out", "o.png"],
     ["teacher_trunc/model.safetensors", "truncated"]),
    (["distill", "--teacher", "{fx}/teacher_trunc", "--out", "r"], ["teacher_trunc/model.safetensors", "truncated"]),
    (["teacher", "sample", "--teacher", "{fx}/no_index", "--out", "o.png"],
     ["no_index/model_index.json is missing", "unet", "copy model_index.json"]),
    (["distill", "--teacher", "{fx}/no_index", "--data", "digits", "--out", "r"], ["no_index/model_index.json"]),
    (["teacher", "sample", "--teacher", "{fx}/bad_unet", "--out", "o.png"],
     ["bad_unet/unet/diffusion_pytorch_model.safetensors"]),
    (["sample", "--student", "{fx}/no_json", "--out", "o.png"], ["no_json/student.json is missing"]),
    (["distill", "--teacher", "{fx}/teacher_no_json", "--out", "r"], ["teacher_no_json/model.json is missing"]),
    (["sample", "--student", "{fx}/nothing", "--out", "o.png"], ["no model at", "nothing", "`fewstep distill` run"]),
]


@pytest.mark.parametrize("argv, needles", LOAD_CASES, ids=[" ".join(c[0][:4]).replace("{fx}/", "") for c in LOAD_CASES])
def test_damaged_or_foreign_model_files_are_one_line(fx, scratch, capsys, argv, needles):
    _one_line(capsys, [a.replace("{fx}", str(fx)) for a in argv], *needles)
    assert not any(scratch.iterdir()), list(scratch.iterdir())  # no output was started


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--student", "{fx}/foreign", "--out", "o.png"], "foreign/student.safetensors holds weights of another"),
    (["teacher", "sample", "--teacher", "{fx}/bad_unet", "--out", "o.png"], "bad_unet/unet/diffusion_pytorch_model"),
])
def test_damaged_files_as_a_process(fx, scratch, argv, needle):
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", *[a.replace("{fx}", str(fx)) for a in argv]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr and not any(scratch.iterdir())


def test_a_student_whose_teacher_folder_lost_its_index_names_the_file(fx, scratch, capsys):
    shutil.copytree(fx / "pipe", scratch / "pipe")
    fewstep.distill(str(scratch / "pipe"), data="digits", out=scratch / "run", iterations=1, batch_size=4,
                    evaluate_n=0)
    (scratch / "pipe" / "model_index.json").unlink()
    capsys.readouterr()
    for argv in (["eval", "--model", "run", "--n", "10"], ["sample", "--student", "run", "--out", "s.png"]):
        _one_line(capsys, argv, f"{scratch / 'pipe' / 'model_index.json'} is missing")


def test_the_python_loaders_raise_one_line_user_errors(fx):
    from fewstep.student import load_student

    for load, spec, needle in [(fewstep.load_teacher, fx / "teacher_trunc", "teacher_trunc/model.safetensors"),
                               (fewstep.load_teacher, fx / "student_as_teacher", "is a distilled student"),
                               (fewstep.load_teacher, fx / "no_index", "model_index.json"),
                               (fewstep.load_model, fx / "foreign", "foreign/student.safetensors"),
                               (fewstep.load_model, fx / "teacher_as_student", "not a distilled student"),
                               (load_student, fx / "garbage" / "student", "garbage/student.safetensors")]:
        with pytest.raises(UserError, match=needle) as e:
            load(spec)
        assert "\n" not in str(e.value)


def test_a_damaged_shipped_teacher_names_the_command_that_rebuilds_it(tmp_path, monkeypatch):
    import fewstep.zoo as zoo

    shipped = tmp_path / "zoo"
    shipped.mkdir()
    shutil.copy(ZOO / "ring8.json", shipped)
    (shipped / "ring8.safetensors").write_bytes((ZOO / "ring8.safetensors").read_bytes()[:500])
    monkeypatch.setattr(zoo, "ZOO_DIR", shipped)
    with pytest.raises(UserError, match="ring8.safetensors is not a readable .*`fewstep zoo build ring8`") as e:
        fewstep.load_teacher("ring8")
    assert "\n" not in str(e.value)


def test_a_damaged_degradation_path_names_its_file_and_the_fix(tmp_path):
    from fewstep.methods.disback import DegradationPath

    (tmp_path / "key").mkdir()
    (tmp_path / "key" / "step_001.safetensors").write_bytes(b"\x10" * 40)
    path = DegradationPath(tmp_path / "key", "key", 1, fewstep.load_teacher("ring8"))
    with pytest.raises(UserError, match="step_001.safetensors is not a readable .*remove that folder") as e:
        path.state(1)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------------------
# 4. File-system faults: one line; nothing lost or half-written
# ------------------------------------------------------------------------------------------------------------------
def test_out_that_is_an_existing_file_is_refused(fx, scratch, capsys):
    (scratch / "afile").write_text("keep me")
    for argv in (["sample", "--student", str(fx / "ring8_run"), "--out", "afile"],
                 ["teacher", "sample", "--teacher", "ring8", "--out", "afile"],
                 ["export", "--student", str(fx / "ring8_run"), "--out", "afile"],
                 ["distill", "--teacher", "ring8", "--out", "afile"]):
        _one_line(capsys, argv, "afile")
    for argv in (["sample", "--student", str(fx / "ring8_run"), "--out", "afile/x.png"],
                 ["export", "--student", str(fx / "ring8_run"), "--out", "afile/e"],
                 ["distill", "--teacher", "ring8", "--out", "afile/r"]):
        _one_line(capsys, argv, "afile", "is a file, not a folder")
    assert (scratch / "afile").read_text() == "keep me" and os.listdir(scratch) == ["afile"]


def _refuse_writes_under(monkeypatch: pytest.MonkeyPatch, folder: Path, err: int = errno.EACCES) -> None:
    """Every temporary file fewstep makes below ``folder`` fails as in a read-only place (root ignores modes)."""
    real = fio.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(os.path.abspath(dir)).is_relative_to(folder.resolve()):
            raise PermissionError(err, os.strerror(err), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fio.tempfile, "mkstemp", mkstemp)


def test_out_in_a_read_only_place_is_refused_before_any_work(fx, scratch, capsys, monkeypatch):
    ro = scratch / "ro"
    ro.mkdir()
    _refuse_writes_under(monkeypatch, ro, errno.EROFS)
    for argv in (["sample", "--student", str(fx / "ring8_run"), "--out", "ro/x.png"],
                 ["teacher", "sample", "--teacher", "digits", "--out", "ro/sub/x.png"],
                 ["export", "--student", str(fx / "ring8_run"), "--out", "ro/e"],
                 ["distill", "--teacher", "ring8", "--out", "ro/run"]):
        _one_line(capsys, argv, "cannot write in", "ro", "Read-only file system", "choose another --out")
    assert not any(ro.iterdir())


def _real_read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    for cand in (Path("/sys"), Path("/proc")):  # root writes anywhere a mode forbids; these refuse it too
        try:
            (cand / "fewstep-probe").mkdir()
        except OSError:
            return cand
        (cand / "fewstep-probe").rmdir()
    pytest.skip("no read-only folder to try")


def test_out_in_a_read_only_place_as_a_process(scratch):
    ro = _real_read_only_folder(scratch)
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "distill", "--teacher", "ring8", "--out",
                           str(ro / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--out {ro / 'run'}: cannot write in {ro}" in lines[0], proc.stderr


class _FullDisk:
    """A file object whose writes put half the bytes on disk and then fail with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def _disk_full_for(monkeypatch: pytest.MonkeyPatch, fragment: str) -> None:
    """Atomic writes of files whose name holds ``fragment`` hit a full disk (Linux: the name from /proc)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{fd}")
        f = real(fd, *args, **kwargs)
        return _FullDisk(f) if fragment in Path(name).name else f

    monkeypatch.setattr(fio.os, "fdopen", fdopen)


RING8_RUN = ["distill", "--teacher", "ring8", "--iterations", "4", "--checkpoint-every", "2", "--batch-size", "16"]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resumes(scratch, capsys, monkeypatch):
    from fewstep.train.loop import load_checkpoint

    _disk_full_for(monkeypatch, ".step_00000004.pt.")
    _last_line(capsys, [*RING8_RUN, "--out", "run"], "run/checkpoints/step_00000004.pt", "No space left on device",
               "--resume")
    ckpts = sorted(p.name for p in (scratch / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000002.pt"]
    assert load_checkpoint(scratch / "run" / "checkpoints" / ckpts[0])["iteration"] == 2  # the last one, whole
    assert not (scratch / "run" / "student.json").exists()
    _no_temporaries(scratch)
    monkeypatch.undo()
    monkeypatch.chdir(scratch)
    assert main([*RING8_RUN, "--out", "run", "--resume"]) == 0
    assert (scratch / "run" / "report.html").is_file()


@pytest.mark.parametrize("fragment, name, cause", [
    (".step_00000004.png.", "run/samples/step_00000004.png", "Permission denied"),
    (".step_00000004.png.", "run/samples/step_00000004.png", "No space left on device"),
    (".report.html.", "run/report.html", "No space left on device"),
])
def test_a_failed_grid_or_report_write_is_one_line(scratch, capsys, monkeypatch, fragment, name, cause):
    if cause == "Permission denied":  # a folder made read-only mid-run
        real = fio.tempfile.mkstemp

        def mkstemp(*args, prefix="", **kwargs):
            if prefix == fragment:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, prefix=prefix, **kwargs)

        monkeypatch.setattr(fio.tempfile, "mkstemp", mkstemp)
    else:
        _disk_full_for(monkeypatch, fragment)
    _last_line(capsys, [*RING8_RUN, "--out", "run"], name, cause)
    assert not (scratch / name).exists()
    assert (scratch / "run" / "checkpoints" / "step_00000002.pt").is_file()
    _no_temporaries(scratch)


def test_a_full_disk_in_the_metrics_log_is_one_line(scratch, capsys, monkeypatch):
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fio, "open", full, raising=False)  # append_text's open
    _last_line(capsys, [*RING8_RUN, "--out", "run"], "run/metrics.jsonl", "No space left on device")


def test_a_full_disk_while_sampling_writes_nothing(fx, scratch, capsys, monkeypatch):
    _disk_full_for(monkeypatch, ".grid.png.")
    _one_line(capsys, ["sample", "--student", str(fx / "digits_run"), "--n", "10", "--out", "grid.png"],
              "cannot write grid.png", "No space left on device")
    assert os.listdir(scratch) == []


def test_atomic_writes_leave_the_old_file_and_no_temporary(scratch, monkeypatch):
    target = scratch / "eval.json"
    target.write_text("old")
    _disk_full_for(monkeypatch, ".eval.json.")
    with pytest.raises(UserError, match="cannot write .*eval.json \\(No space left on device\\)") as e:
        fio.atomic_write_json(target, {"fid": 1.0})
    assert "\n" not in str(e.value) and target.read_text() == "old" and os.listdir(scratch) == ["eval.json"]


def test_an_export_is_written_whole_or_not_at_all(scratch):
    from fewstep.export import _write_folder

    def write(tmp: Path) -> None:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights.safetensors").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="cannot write .*exp .No space left on device"):
        _write_folder(scratch / "exp", write)
    assert os.listdir(scratch) == []
    _write_folder(scratch / "exp", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert os.listdir(scratch) == ["exp"] and (scratch / "exp" / "a.txt").read_text() == "a"


def test_other_os_errors_are_one_line_naming_the_path(scratch, capsys, monkeypatch):
    import fewstep.api

    def denied(spec):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/model.json")

    monkeypatch.setattr(fewstep.api, "load_model", denied)
    _one_line(capsys, ["eval", "--model", "x"], "/data/model.json: Permission denied")


# ------------------------------------------------------------------------------------------------------------------
# sample --out: a folder gets samples.png; the suffix picks the format (or is refused with the choices)
# ------------------------------------------------------------------------------------------------------------------
MAGIC = {".png": b"\x89PNG", ".jpg": b"\xff\xd8", ".jpeg": b"\xff\xd8", ".webp": b"RIFF", ".pdf": b"%PDF"}


def test_sample_out_a_folder_writes_samples_png_into_it(fx, scratch, capsys):
    (scratch / "existing").mkdir()
    for out in ("existing", "new/"):
        assert main(["sample", "--student", str(fx / "digits_run"), "--n", "4", "--out", out]) == 0
        assert (scratch / out / "samples.png").read_bytes()[:4] == MAGIC[".png"]
    _one_line(capsys, ["sample", "--student", str(fx / "digits_run"), "--out", "existing"],
              "existing/samples.png already exists")


@pytest.mark.parametrize("run, suffix", [("digits_run", s) for s in MAGIC] + [("ring8_run", ".jpg"),
                                                                              ("ring8_run", ".pdf")])
def test_the_suffix_picks_the_format(fx, scratch, run, suffix):
    assert main(["sample", "--student", str(fx / run), "--n", "4", "--out", f"s{suffix}"]) == 0
    assert (scratch / f"s{suffix}").read_bytes()[:4].startswith(MAGIC[suffix])
    if suffix == ".webp":
        assert (scratch / f"s{suffix}").read_bytes()[8:12] == b"WEBP"


def test_suffixes_no_writer_makes_are_refused_with_the_choices(fx, scratch, capsys):
    assert main(["sample", "--student", str(fx / "ring8_run"), "--n", "4", "--out", "p.svg"]) == 0  # plots: svg too
    assert b"<svg" in (scratch / "p.svg").read_bytes()
    for run, out, needle in [("digits_run", "g.gif", "suffix '.gif'"), ("digits_run", "g.svg", "suffix '.svg'"),
                             ("digits_run", "grid", "no suffix"), ("ring8_run", "p.bmp", "suffix '.bmp'")]:
        _one_line(capsys, ["sample", "--student", str(fx / run), "--out", out], out, needle, ".png, .jpg")
    _one_line(capsys, ["teacher", "sample", "--teacher", "digits", "--n", "4", "--steps", "2", "--out", "t.tiff"],
              "t.tiff", ".png, .jpg, .jpeg, .webp, .pdf")
    _one_line(capsys, ["sample", "--student", str(fx / "digits_run"), "--n", "5000", "--out", "big.webp"],
              "WEBP encodes at most 16,383", ".png")
    assert sorted(os.listdir(scratch)) == ["p.svg"]


# ------------------------------------------------------------------------------------------------------------------
# 6. A real-teacher run finishes: the data and guidance the user gave reach the report
# ------------------------------------------------------------------------------------------------------------------
def test_a_diffusers_teacher_run_on_digits_finishes_with_its_report(scratch, capsys):
    hf_tiny.unet2d(folder=scratch / "pipe", channels=1)  # digits-shaped: the digits classifier measures it
    assert main(["distill", "--method", "dmd2", "--teacher", "pipe", "--data", "digits", "--steps", "1",
                 "--iterations", "3", "--out", "r"]) == 0
    rows = json.loads((scratch / "r" / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["student", "teacher (ddim)", "teacher (heun)"]
    assert all(r["data"] == "digits" and np.isfinite(r["fid"]) for r in rows)
    assert "on digits" in (scratch / "r" / "report.html").read_text()
    capsys.readouterr()
    assert main(["eval", "--model", "r", "--n", "50", "--json"]) == 0  # the run's student knows its data
    assert json.loads(capsys.readouterr().out)["data"] == "digits"
    assert main(["sample", "--student", "r", "--n", "4", "--out", "s.png"]) == 0
    _one_line(capsys, ["eval", "--model", "pipe", "--n", "10"], "pass --data")  # the bare teacher records none


def test_the_report_samples_a_conditional_teacher_with_the_runs_guidance(scratch):
    fewstep.distill("digits", out=scratch / "g", iterations=1, batch_size=4, guidance_scale=2.0, evaluate_n=20)
    rows = json.loads((scratch / "g" / "eval.json").read_text())
    assert [r["cfg_scale"] for r in rows[1:]] == [2.0, 2.0] and rows[1]["nfe"] == 2  # CFG: two calls a step
    assert json.loads((scratch / "g" / "student.json").read_text())["meta"]["guidance_scale"] == 2.0
    assert "CFG scale 2" in (scratch / "g" / "report.html").read_text()
