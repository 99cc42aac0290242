"""Bad input, tried as a user would: every case is a `fewstep` command run as its own process.

Each case must end with exit status 2, one line on stderr (``fewstep: error: ...``, no traceback) that names what
is wrong, and no file created or changed anywhere but the scratch folder the case runs in. The same table drives
``tests/test_faults.py`` (every case, in CI) and ``benchmarks/faults.py`` (the count in the README).

Placeholders in a case's arguments: ``{fx}`` is the folder of read-only fixtures made once by
:func:`make_fixtures` (damaged models, bad configs and data files, a finished student run), ``{out}`` a path in the
case's scratch folder that does not exist yet.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    needles: tuple[str, ...] = ()  # substrings the error line must hold (the bad value, the file, the fix)


def _c(name: str, cmd: str, *needles: str) -> Case:
    return Case(name, tuple(cmd.split()), needles)


CASES: list[Case] = [
    # --- the command line itself --------------------------------------------------------------------------
    _c("no_command", ""),
    _c("unknown_command", "frobnicate", "frobnicate"),
    _c("distill_without_out", "distill", "--out"),
    _c("unknown_flag", "distill --out {out} --bogus-flag 3", "--bogus-flag"),
    _c("unknown_method", "distill --method dmd3 --out {out}", "dmd3"),
    _c("base_without_disback", "distill --method dmd2 --base dmd2 --out {out}", "--base"),
    _c("disback_unknown_base", "distill --method disback --base lightning --out {out}", "lightning"),
    _c("unknown_zoo_name", "zoo build imagenet", "imagenet"),
    _c("unknown_export_format", "export --student {fx}/student_run --format onnx --out {out}", "onnx"),
    # --- numbers ------------------------------------------------------------------------------------------
    _c("steps_zero", "distill --steps 0 --out {out}", "--steps"),
    _c("steps_negative", "distill --steps -2 --out {out}", "--steps"),
    _c("steps_not_a_number", "distill --steps four --out {out}", "--steps"),
    _c("student_steps_above_schedule", "distill --steps 2000 --out {out}", "2000"),
    _c("iterations_zero", "distill --iterations 0 --out {out}", "--iterations"),
    _c("iterations_absurd", "distill --iterations 100000000000 --out {out}", "iterations"),
    _c("batch_size_zero", "distill --batch-size 0 --out {out}", "--batch-size"),
    _c("guidance_nan", "distill --guidance-scale nan --out {out}", "nan"),
    _c("guidance_inf", "distill --guidance-scale inf --out {out}", "inf"),
    _c("guidance_negative", "distill --guidance-scale -1 --out {out}", "-1"),
    _c("teacher_steps_above_schedule", "teacher sample --teacher grid25 --steps 5000 --out {out}.png", "5000"),
    _c("teacher_steps_zero", "teacher sample --teacher grid25 --steps 0 --out {out}.png", "--steps"),
    _c("cfg_nan", "teacher sample --teacher digits --cfg-scale nan --out {out}.png", "nan"),
    _c("cfg_negative", "teacher sample --teacher digits --cfg-scale -3 --out {out}.png", "-3"),
    _c("sample_n_zero", "teacher sample --teacher grid25 --n 0 --out {out}.png", "--n"),
    _c("sample_n_huge", "sample --student {fx}/student_run --n 100000000000 --out {out}.png", "100000000000"),
    _c("eval_n_huge", "eval --model grid25 --n 100000000000", "100000000000"),
    _c("eval_steps_above_schedule", "eval --model grid25 --steps 4000", "4000"),
    _c("eval_cfg_inf", "eval --model digits --cfg-scale inf", "inf"),
    _c("eval_patch_size_zero", "eval --model digits --patch-fid --patch-size 0", "--patch-size"),
    _c("export_rank_zero", "export --student {fx}/student_run --format lora --rank 0 --out {out}", "--rank"),
    _c("train_iterations_zero", "teacher train --data grid25 --iterations 0 --out {out}", "--iterations"),
    _c("config_lr_negative", "distill --config {fx}/lr_negative.yaml --out {out}", "lr"),
    _c("config_lr_nan", "distill --config {fx}/lr_nan.yaml --out {out}", "lr"),
    _c("config_batch_zero", "distill --config {fx}/batch_zero.yaml --out {out}", "batch_size"),
    # --- names and paths that do not exist ----------------------------------------------------------------
    _c("unknown_teacher", "distill --teacher sdxl-turbo --out {out}", "sdxl-turbo"),
    _c("unknown_data", "distill --data mnist --out {out}", "mnist"),
    _c("train_unknown_data", "teacher train --data cifar10 --out {out}", "cifar10"),
    _c("train_missing_points", "teacher train --data {fx}/missing.npy --out {out}", "missing.npy"),
    _c("sample_unknown_teacher", "teacher sample --teacher sd15 --out {out}.png", "sd15"),
    _c("unknown_sampler", "teacher sample --teacher grid25 --sampler dpmpp --out {out}.png", "dpmpp"),
    _c("eval_unknown_sampler", "eval --model grid25 --sampler lms", "lms"),
    _c("eval_unknown_model", "eval --model {fx}/nothing_here", "nothing_here"),
    _c("eval_unknown_data", "eval --model grid25 --data imagenet", "imagenet"),
    _c("sample_missing_student", "sample --student {fx}/no_such_run --out {out}.png", "no_such_run"),
    _c("export_missing_student", "export --student {fx}/no_such_run --format lora --out {out}", "no_such_run"),
    _c("config_missing", "distill --config {fx}/missing.yaml --out {out}", "missing.yaml"),
    _c("inception_weights_missing", "distill --teacher digits --inception-weights {fx}/none.pth --out {out}",
       "none.pth"),
    _c("eval_inception_missing", "eval --model digits --inception --inception-weights {fx}/none.pth", "none.pth"),
    _c("eval_clip_without_prompts", "eval --model digits --clip {fx}", "--clip"),
    _c("eval_prompts_missing", "eval --model digits --prompts {fx}/none.txt", "none.txt"),
    # --- bad files ----------------------------------------------------------------------------------------
    _c("config_not_yaml", "distill --config {fx}/garbage.yaml --out {out}", "garbage.yaml"),
    _c("config_unknown_key", "distill --config {fx}/unknown_key.yaml --out {out}", "learning_rat"),
    _c("config_wrong_type", "distill --config {fx}/wrong_type.yaml --out {out}", "steps"),
    _c("config_other_method", "distill --method dmd2 --config {fx}/add.yaml --out {out}", "add"),
    _c("points_wrong_shape", "teacher train --data {fx}/points3d.npy --out {out}", "points3d.npy"),
    _c("points_empty_csv", "teacher train --data {fx}/empty.csv --out {out}", "empty.csv"),
    _c("points_not_numbers", "teacher train --data {fx}/words.csv --out {out}", "words.csv"),
    _c("points_nan", "teacher train --data {fx}/nan.npy --out {out}", "nan.npy"),
    _c("student_truncated", "sample --student {fx}/student_truncated --out {out}.png", "student.safetensors"),
    _c("student_garbage", "sample --student {fx}/student_garbage --out {out}.png", "student.safetensors"),
    _c("student_foreign_weights", "sample --student {fx}/student_foreign --out {out}.png", "student.safetensors"),
    _c("student_json_garbage", "eval --model {fx}/student_badjson", "student.json"),
    _c("teacher_json_as_student", "sample --student {fx}/student_teacherjson --out {out}.png", "student.json"),
    _c("student_json_missing", "sample --student {fx}/student_nojson --out {out}.png", "student.json"),
    _c("student_as_teacher", "teacher sample --teacher {fx}/student_run/student.json --out {out}.png", "student"),
    _c("distill_run_as_teacher", "distill --teacher {fx}/student_run --out {out}", "student_run"),
    _c("teacher_truncated", "teacher sample --teacher {fx}/teacher_truncated --out {out}.png", "model.safetensors"),
    _c("teacher_shape_mismatch", "eval --model {fx}/teacher_shapes", "model.safetensors"),
    _c("diffusers_without_model_index", "distill --teacher {fx}/diffusers_no_index --out {out}", "model_index.json"),
    # --- where results go ---------------------------------------------------------------------------------
    _c("out_is_a_file", "distill --out {fx}/a_file.txt", "a_file.txt"),
    _c("out_not_empty", "distill --out {fx}/nonempty", "nonempty"),
    _c("train_out_is_a_file", "teacher train --data grid25 --out {fx}/a_file.txt", "a_file.txt"),
    _c("out_read_only", "distill --teacher grid25 --iterations 2 --out /proc/fewstep-run", "/proc/fewstep-run"),
    _c("resume_without_checkpoint", "distill --resume --out {fx}/nonempty", "checkpoint"),
    _c("sample_out_exists", "sample --student {fx}/student_run --out {fx}/a_file.txt", "a_file.txt"),
    _c("sample_bad_suffix", "teacher sample --teacher grid25 --out {out}.xyz", ".xyz"),
    _c("sample_gif_suffix", "sample --student {fx}/student_run --out {out}.gif", ".gif"),
    _c("out_below_a_file", "distill --out {fx}/a_file.txt/run", "a_file.txt"),
    _c("sample_out_read_only", "sample --student {fx}/student_run --out /proc/fewstep.png", "/proc/fewstep.png"),
    _c("export_out_exists", "export --student {fx}/student_run --format lora --out {fx}/nonempty", "nonempty"),
    _c("export_embedded_student", "export --student {fx}/student_run --format diffusers --out {out}", "diffusers"),
    _c("demo_out_exists", "demo --out {fx}/nonempty", "nonempty"),
]


# ----------------------------------------------------------------------------------------------------------------
def make_fixtures(fx: Path) -> Path:
    """The inputs the cases read, in ``fx``: bad configs and data files, damaged and foreign model files, and one
    finished (tiny, untrained) student run. Built in-process in a few seconds; nothing is trained."""
    import numpy as np
    import yaml

    import fewstep
    from fewstep.models import save_denoiser
    from fewstep.student import Student, save_student

    fx.mkdir(parents=True, exist_ok=True)
    (fx / "a_file.txt").write_text("an earlier result\n")
    (fx / "nonempty").mkdir()
    (fx / "nonempty" / "metrics.jsonl").write_text('{"it": 50}\n')
    (fx / "nonempty" / "config.yaml").write_text("method: dmd2\n")

    # configs
    (fx / "garbage.yaml").write_text("method: [dmd2\n  : : :\n")
    (fx / "unknown_key.yaml").write_text("method: dmd2\nlearning_rat: 0.1\n")
    (fx / "wrong_type.yaml").write_text("method: dmd2\nsteps: many\n")
    (fx / "lr_negative.yaml").write_text(yaml.safe_dump({"method": "dmd2", "lr_generator": -1e-3}))
    (fx / "lr_nan.yaml").write_text("method: dmd2\nlr_generator: .nan\n")
    (fx / "batch_zero.yaml").write_text(yaml.safe_dump({"method": "dmd2", "loop": {"batch_size": 0}}))
    (fx / "add.yaml").write_text(yaml.safe_dump({"method": "add"}))

    # point files
    np.save(fx / "points3d.npy", np.zeros((10, 2, 2), dtype=np.float32))
    (fx / "empty.csv").write_text("")
    (fx / "words.csv").write_text("x,y\nleft,right\nup,down\n")
    pts = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    pts[3, 1] = np.nan
    np.save(fx / "nan.npy", pts)

    # a finished student run of the grid25 teacher (untrained: the cases only load it)
    teacher = fewstep.load_teacher("grid25")
    run = fx / "student_run"
    run.mkdir()
    save_student(Student(teacher, [999.0]), run / "student", method="dmd2", teacher="grid25", data="grid25", steps=1)
    weights = (run / "student.safetensors").read_bytes()
    student_json = (run / "student.json").read_text()

    def damaged(name: str, weights_bytes: bytes, json_text: str = student_json) -> None:
        (fx / name).mkdir()
        (fx / name / "student.safetensors").write_bytes(weights_bytes)
        (fx / name / "student.json").write_text(json_text)

    damaged("student_truncated", weights[: len(weights) // 2])
    damaged("student_garbage", os.urandom(4096))
    digits = fewstep.load_teacher("digits")  # a real safetensors file of another network
    save_denoiser(digits, fx / "digits_model", kind="teacher")
    damaged("student_foreign", (fx / "digits_model.safetensors").read_bytes())
    damaged("student_badjson", weights, '{"format": "fewstep-denoiser", "network": ')
    (fx / "student_nojson").mkdir()
    (fx / "student_nojson" / "student.safetensors").write_bytes(weights)
    teacher_json = json.loads(student_json)
    teacher_json["meta"] = {"kind": "teacher", "data": "grid25"}
    damaged("student_teacherjson", weights, json.dumps(teacher_json))

    # teachers: a truncated file, and weights whose shapes do not match the description
    (fx / "teacher_truncated").mkdir()
    save_denoiser(teacher, fx / "teacher_truncated" / "model", kind="teacher", data="grid25")
    w = fx / "teacher_truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    (fx / "teacher_shapes").mkdir()
    save_denoiser(teacher, fx / "teacher_shapes" / "model", kind="teacher", data="grid25")
    desc = json.loads((fx / "teacher_shapes" / "model.json").read_text())
    desc["network"]["width"] = int(desc["network"].get("width", 256)) // 2
    (fx / "teacher_shapes" / "model.json").write_text(json.dumps(desc))

    # a diffusers pipeline folder that lost its model_index.json
    hf = fx / "diffusers_no_index"
    (hf / "unet").mkdir(parents=True)
    (hf / "scheduler").mkdir()
    (hf / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (hf / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    return fx


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its contents (folders: '/')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "/" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    case: Case
    returncode: int
    stderr: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_case(case: Case, fx: Path, scratch: Path, timeout: float = 120.0) -> Outcome:
    """Run one case in its own scratch folder (its working directory, HOME and caches) and check the three
    promises: exit 2, one clean line naming the problem, and nothing written outside the scratch folder."""
    work, home = scratch / "cwd", scratch / "home"
    work.mkdir(parents=True)
    home.mkdir()
    out = scratch / "out"
    args = [a.format(fx=fx, out=out) for a in case.args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEWSTEP_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), MPLCONFIGDIR=str(home / ".mpl"),
               TMPDIR=str(scratch), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    before = snapshot(fx)
    try:
        proc = subprocess.run([sys.executable, "-m", "fewstep.cli", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = -1, f"timed out after {timeout:.0f} s"
    problems = []
    if code != 2:
        problems.append(f"exit status {code}, not 2")
    lines = stderr.strip().splitlines()
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, not 1")
    if "Traceback" in stderr:
        problems.append("a traceback")
    if lines and not lines[0].startswith("fewstep: error:"):
        problems.append("the line does not start with 'fewstep: error:'")
    for needle in case.needles:
        if needle not in stderr:
            problems.append(f"the message does not name {needle!r}")
    if snapshot(fx) != before:
        problems.append("a fixture was created, changed or removed")
    written = [str(p.relative_to(scratch)) for p in sorted(scratch.rglob("*"))
               if p.is_file() and not str(p.relative_to(scratch)).startswith(("home/.mpl", "home/.cache/matplotlib"))]
    if written:
        problems.append(f"files written: {written[:5]}")
    for outside in ("/proc/fewstep-run", "/proc/fewstep.png"):
        if Path(outside).exists():
            problems.append(f"{outside} was created")
    return Outcome(case, code, stderr, problems)


def run_all(cases: list[Case] | None = None, workers: int = 2) -> list[Outcome]:
    """Every case (default: all of :data:`CASES`), ``workers`` at a time, each in a fresh scratch folder."""
    cases = CASES if cases is None else cases
    with tempfile.TemporaryDirectory(prefix="fewstep-faults-") as tmp:
        fx = make_fixtures(Path(tmp) / "fixtures")
        for p in fx.rglob("*"):  # read-only, so that a write into them fails loudly as well as being detected
            if p.is_file():
                p.chmod(0o444)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(run_case, c, fx, Path(tmp) / f"case_{i:03d}") for i, c in enumerate(cases)]
            return [f.result() for f in futures]


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    return {"bad_inputs_tried": len(outcomes), "bad_inputs_clean": sum(o.ok for o in outcomes),
            "failures": {o.case.name: o.problems for o in outcomes if not o.ok}}
