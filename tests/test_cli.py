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
    assert [r["nfe"] for r in rows if r["model"] == "teacher"] == [1, 2, 4, 8, 15, 31, 63]
    # the demo's report and its DMD2 run's own (with eval.json) stand alone, pictures embedded (test_report_html)
    from test_report_html import assert_self_contained

    assert (tmp_path / "runs" / "demo" / "dmd2" / "eval.json").is_file()
    assert len(assert_self_contained(report)) == 1 + 7 + 1 + 1  # NFE curve, 7 teacher grids, student, last grid
    assert assert_self_contained(tmp_path / "runs" / "demo" / "dmd2" / "report.html")
    # a second demo never overwrites the first
    assert main(["demo", "--n", "100", "--distill-iterations", "3"]) == 0
    assert (tmp_path / "runs" / "demo-1" / "report.html").is_file() and report.read_text() == text


def test_inception_fid_names_the_missing_weights(tmp_path: Path) -> None:
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    proc = run_cli("eval", "--model", "digits", "--n", "20", "--steps", "1", "--inception-weights", str(missing))
    assert_one_line_error(proc, "pt_inception-2015-12-05-6726825d.pth")


# ------------------------------------------------------------------------ numbers are checked before work starts
def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("fewstep: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _parse(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> None:
    """An argparse-level refusal: SystemExit(2) and one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("fewstep: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# (argv with {out} for a path under the scratch directory, needles): refused after parsing, before any sampling
CHECKED_CASES = [
    (["teacher", "sample", "--teacher", "digits", "--steps", "2000", "--out", "{out}/g.png"],
     ["--steps 2000", "1000 timesteps", "--steps 1000 or fewer"]),
    (["teacher", "sample", "--teacher", "digits", "--prompt", "a cat", "--steps", "2000", "--out", "{out}/g.png"],
     ["--steps 2000", "--steps 1000 or fewer"]),
    (["eval", "--model", "grid25", "--steps", "5000", "--n", "10"], ["--steps 5000", "--steps 1000 or fewer"]),
    (["sample", "--student", "digits", "--n", "10000000", "--out", "{out}/g.png"],
     ["--n 10000000", "megapixels", "--n 35640 or fewer"]),
    (["teacher", "sample", "--teacher", "digits", "--n", "40000", "--out", "{out}/g.png"], ["--n 35640 or fewer"]),
    (["teacher", "sample", "--teacher", "grid25", "--n", "10000000", "--out", "{out}/g.png"],
     ["--n 10000000", "scatter plot", "--n 1000000 or fewer"]),
    (["eval", "--model", "digits", "--n", str(10**13)], ["--n 10000000000000", "GB", "memory is available"]),
    (["demo", "--n", str(10**13), "--out", "{out}/demo"], ["--n 10000000000000", "memory is available"]),
]


@pytest.mark.parametrize("argv, needles", CHECKED_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_numbers_checked_before_sampling(argv: list[str], needles: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    _one_line_exit_2([a.format(out=tmp_path) for a in argv], capsys, *needles)
    assert _files(tmp_path) == {}


# refused by the argument types (argparse): nothing loaded at all
PARSED_CASES = [
    (["teacher", "sample", "--teacher", "digits", "--cfg-scale", "nan", "--out", "{out}/g.png"],
     ["--cfg-scale must be a finite number of at least 0", "nan"]),
    (["teacher", "sample", "--teacher", "digits", "--cfg-scale", "inf", "--out", "{out}/g.png"],
     ["--cfg-scale", "inf"]),
    (["teacher", "sample", "--teacher", "digits", "--cfg-scale", "-1", "--out", "{out}/g.png"], ["--cfg-scale", "-1"]),
    (["eval", "--model", "digits", "--cfg-scale=-inf"], ["--cfg-scale", "-inf"]),
    (["distill", "--guidance-scale", "nan", "--out", "{out}/r"], ["--guidance-scale", "nan"]),
    (["distill", "--guidance-scale", "inf", "--out", "{out}/r"], ["--guidance-scale", "inf"]),
    (["distill", "--iterations", "0", "--out", "{out}/r"], ["--iterations must be from 1 to 1000000000, got 0"]),
    (["distill", "--iterations", "-5", "--out", "{out}/r"], ["--iterations", "-5"]),
    (["distill", "--iterations", "2000000000", "--out", "{out}/r"], ["--iterations", "2000000000"]),
    (["distill", "--iterations", "nan", "--out", "{out}/r"], ["--iterations must be a whole number", "'nan'"]),
    (["teacher", "train", "--iterations", "0", "--out", "{out}/r"], ["--iterations", "got 0"]),
    (["distill", "--batch-size", "0", "--out", "{out}/r"], ["--batch-size must be from 1 to 1048576, got 0"]),
    (["teacher", "train", "--batch-size", str(2**21), "--out", "{out}/r"], ["--batch-size", str(2**21)]),
    (["distill", "--steps", "9", "--out", "{out}/r"], ["--steps must be from 1 to 8, got 9"]),
    (["distill", "--steps", "0", "--out", "{out}/r"], ["--steps", "got 0"]),
    (["teacher", "sample", "--teacher", "digits", "--seed", str(2**64), "--out", "{out}/g.png"], ["--seed", "from 0"]),
    (["eval", "--model", "digits", "--seed", "-1"], ["--seed", "-1"]),
    (["sample", "--student", "digits", "--n", "0", "--out", "{out}/g.png"], ["--n must be at least 1, got 0"]),
    (["demo", "--distill-iterations", "0"], ["--distill-iterations", "got 0"]),
    (["distill", "--resolution", "100000", "--out", "{out}/r"], ["--resolution must be from 1 to 16384"]),
]


@pytest.mark.parametrize("argv, needles", PARSED_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_numbers_checked_when_parsed(argv: list[str], needles: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    _parse([a.format(out=tmp_path) for a in argv], capsys, *needles)
    assert _files(tmp_path) == {}


# a config's numbers: (method, YAML, needles); the run directory is never made
CONFIG_CASES = [
    ("dmd2", "guidance_scale: .nan\n", ["guidance_scale: Input should be a finite number (got nan)"]),
    ("dmd2", "guidance_scale: .inf\n", ["guidance_scale", "finite", "inf"]),
    ("add", "guidance_scale: -2\n", ["guidance_scale", "greater than or equal to 1", "-2"]),
    ("dmd2", "lr_generator: 2.0\n", ["lr_generator: Input should be less than or equal to 1 (got 2.0)"]),
    ("lightning", "lr_head: .nan\n", ["lr_head", "finite"]),
    ("add", "lr_discriminator: 0\n", ["lr_discriminator", "greater than 0"]),
    ("dmd2", "loop:\n  iterations: 2000000000\n", ["loop.iterations", "less than or equal to 1000000000"]),
    ("disback", "loop:\n  batch_size: 0\n", ["loop.batch_size", "got 0"]),
    ("disback", "dmd2:\n  guidance_scale: .inf\n", ["dmd2.guidance_scale", "finite"]),
    ("add", "steps: 8\n", ["steps 8 is more than student_times 4", "--steps 4 or fewer"]),  # times ADD never trains
    # checked against the teacher's schedule right after it loads, before the data or any training
    ("lightning", "teacher_steps: 2048\n", ["teacher_steps 2048 is more than", "1000 timesteps", "1000 or fewer"]),
]


@pytest.mark.parametrize("method, yaml_text, needles", CONFIG_CASES,
                         ids=[f"{m}: {y.strip()}" for m, y, _ in CONFIG_CASES])
def test_config_numbers_checked(method: str, yaml_text: str, needles: list[str], tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    _one_line_exit_2(["distill", "--method", method, "--config", str(cfg), "--out", str(tmp_path / "r")], capsys,
                     *needles)
    assert not (tmp_path / "r").exists()


def test_teacher_config_numbers_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: grid25\nlr: .inf\n")
    _one_line_exit_2(["teacher", "train", "--config", str(cfg), "--out", str(tmp_path / "r")], capsys, "lr", "finite")
    assert not (tmp_path / "r").exists()


def test_api_checks_numbers_before_sampling() -> None:
    """Python users get the same checks: fewstep.generate/evaluate refuse before drawing anything."""
    import fewstep
    from fewstep import UserError

    teacher = fewstep.load_teacher("grid25")
    with pytest.raises(UserError, match=r"--steps 1001 is more than .*\(1000 timesteps\)"):
        fewstep.generate(teacher, 4, steps=1001)
    assert fewstep.generate(teacher, 4, steps=1000, sampler="ddim")[0].shape == (4, 2)  # the limit itself runs
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(UserError, match="finite number of at least 0"):
            fewstep.generate(teacher, 4, steps=1, cfg_scale=bad)
        with pytest.raises(UserError, match="finite number of at least 0"):
            fewstep.evaluate(teacher, n=4, steps=1, cfg_scale=bad)
    with pytest.raises(UserError, match="whole number"):
        fewstep.generate(teacher, 4, steps=2.5)
    with pytest.raises(UserError, match="memory is available"):
        fewstep.evaluate(teacher, n=10**13)


def test_memory_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """n x sample size x 4 bytes x SAMPLE_COPIES against the memory available: the largest n named fits, one more
    does not."""
    from fewstep import api
    from fewstep.errors import UserError

    monkeypatch.setattr(api, "available_memory", lambda: 10**6)
    per_sample = 64 * 4 * api.SAMPLE_COPIES
    most = 10**6 // per_sample
    assert api.check_sample_count(most, (1, 8, 8)) == most
    with pytest.raises(UserError, match=f"--n {most + 1} needs .* pass --n {most} or fewer"):
        api.check_sample_count(most + 1, (1, 8, 8))


def test_grid_cap_names_the_largest_n_that_fits() -> None:
    from fewstep.errors import UserError
    from fewstep.eval.images import GRID_ROW, MAX_GRID_PIXELS, check_picture, grid_size

    for shape in ((1, 8, 8), (3, 64, 96), (3, 512, 512)):
        with pytest.raises(UserError) as info:
            check_picture(10**8, shape)
        most = int(str(info.value).split("pass --n ")[1].split()[0])
        check_picture(most, shape)
        height, width = grid_size(most, *shape[1:], nrow=GRID_ROW)
        assert height * width <= MAX_GRID_PIXELS
        height, width = grid_size(most + 1, *shape[1:], nrow=GRID_ROW)
        assert height * width > MAX_GRID_PIXELS


# ---------------------------------------------------------------------------------------------- start-up and help
def test_help_does_not_import_torch() -> None:
    """`fewstep --help` builds the parser without torch (5 s of imports), and the lazy package still serves the API."""
    code = """
import sys
from fewstep.cli import main
for argv in (["--help"], ["distill", "--help"], ["teacher", "sample", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "pydantic", "numpy", "diffusers"))
assert not heavy, heavy
import fewstep
from fewstep.export import FORMATS  # importing the submodule leaves fewstep.export the function
assert callable(fewstep.export) and fewstep.export.__module__ == "fewstep.export", fewstep.export
assert fewstep.distill.__module__ == "fewstep.distillation" and fewstep.load_teacher.__module__ == "fewstep.api"
assert set(fewstep.__all__) <= set(dir(fewstep))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    import fewstep

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"fewstep {version('fewstep')}\n"
    assert version("fewstep") == fewstep.__version__  # pyproject.toml and the package agree


def _parsers(parser=None, prefix: str = "fewstep") -> list[tuple[str, object]]:
    import argparse

    from fewstep.cli import build_parser

    parser = parser or build_parser()
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{prefix} {name}")
    return found


def test_help_shows_every_default() -> None:
    """Every option that takes a value and is not required says its default: argparse's "(default: X)", or, when
    the default is None, its own words for what it falls back to."""
    import argparse

    from fewstep.cli import _HelpFormatter

    formatter = _HelpFormatter("fewstep")
    checked = 0
    for name, parser in _parsers():
        for action in parser._actions:
            if not action.option_strings or action.required or action.nargs == 0:  # positional, --out, flags
                continue
            text = formatter._get_help_string(action) or ""
            assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
            if action.default is not None:
                assert text.endswith("(default: %(default)s)"), f"{name} {action.option_strings[0]}: {text!r}"
            checked += 1
    assert checked > 40
    from fewstep.cli import build_parser

    sample_help = dict(_parsers(build_parser()))["fewstep teacher sample"].format_help()
    assert "(default: 32)" in sample_help and "(default: heun)" in sample_help and "(default: 1.0)" in sample_help


def test_step_limit_follows_the_schedule() -> None:
    """The most steps is the schedule's own: its discrete timesteps (DDPM, flow), a fixed cap for continuous EDM;
    the limit itself makes a grid with every sampler's spacing, one more is refused."""
    from fewstep.api import check_steps, max_steps
    from fewstep.diffusion.samplers import SAMPLERS, sampling_grid
    from fewstep.diffusion.schedule import DDPMSchedule, EDMSchedule, FlowSchedule
    from fewstep.errors import UserError
    from fewstep.options import MAX_CONTINUOUS_STEPS

    for schedule, most in ((DDPMSchedule(num_train_timesteps=50), 50), (FlowSchedule(num_train_timesteps=40), 40),
                           (EDMSchedule(), MAX_CONTINUOUS_STEPS)):
        assert max_steps(schedule) == most
        assert check_steps(most, schedule) == most
        for sampler in SAMPLERS:
            assert len(sampling_grid(schedule, sampler, most)) == most + 1
        with pytest.raises(UserError, match=f"--steps {most + 1} is more than .*; pass --steps {most} or fewer"):
            check_steps(most + 1, schedule)


def test_text_demo_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fewstep demo --text` on the shipped shapes teacher (3 DMD2 iterations, 16 samples): the table's rows carry
    adherence, its grids are labelled by their prompts, both reports stand alone."""
    import yaml

    from fewstep.data.shapes import heldout_prompts, seen_prompts
    from fewstep.demo import GRID_NOISE, _spread
    from fewstep.distillation import make_config
    from test_report_html import assert_self_contained

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--text", "--n", "16", "--distill-iterations", "3"]) == 0
    demo = tmp_path / "runs" / "demo-text"
    rows = json.loads((demo / "metrics.json").read_text())
    teacher = [r for r in rows if r["model"] == "teacher"]
    assert [(r["sampler"], r["nfe"]) for r in teacher] == [("ddim", 1), ("ddim", 2), ("ddim", 4), ("ddim", 8),
                                                           ("heun", 15), ("heun", 31), ("heun", 63), ("heun", 30)]
    assert teacher[-1]["cfg_scale"] == 3.0 and rows[-1]["model"] == "DMD2 student" and rows[-1]["nfe"] == 1
    for r in rows:  # 16 samples: the first 16 held-out compositions, so adherence is the held-out one
        assert 0 <= r["adherence"] <= 1 and r["adherence"] == r["adherence_heldout"] and r["fid"] > 0, r
    eval_rows = json.loads((demo / "dmd2" / "eval.json").read_text())
    assert [r["model"] for r in eval_rows] == ["student", "teacher (ddim)", "teacher (heun)"]
    assert all(r["adherence"] is not None for r in eval_rows)
    # the run used configs/dmd2_shapes.yaml's settings (beside the loop's own for a 3-iteration run)
    shipped = make_config("dmd2", str(Path(__file__).resolve().parent.parent / "configs" / "dmd2_shapes.yaml"))
    ran = yaml.safe_load((demo / "dmd2" / "config.yaml").read_text())
    assert {k: v for k, v in ran.items() if k not in ("loop", "data")} == \
        {k: v for k, v in shipped.model_dump(mode="json").items() if k not in ("loop", "data")}
    assert ran["loop"]["batch_size"] == shipped.loop.batch_size
    text = (demo / "report.html").read_text()
    for prompt in _spread(seen_prompts()) + _spread(heldout_prompts()):  # each grid's rows, named in its caption
        assert prompt in text
    pictures = assert_self_contained(demo / "report.html")
    assert len(pictures) == 1 + 2 + 1  # NFE curve, the seen and held-out grids, the run's last grid
    from PIL import Image

    for name in ("seen", "heldout"):  # 8 prompt rows of 3 models x GRID_NOISE tiles of 16 px upscaled, plus labels
        width, height = Image.open(demo / "samples" / f"{name}.png").size
        assert width > 3 * GRID_NOISE * 16 * 2 and height > 8 * 16 * 2
    assert assert_self_contained(demo / "dmd2" / "report.html")
    assert not (tmp_path / "runs" / "demo").exists()  # the digits demo's place is left alone


@pytest.mark.parametrize("script, args, needle", [
    ("sampling_speed.py", ["--runs", "{tmp}/no_run"], "no model at"),
    ("step_efficiency.py", ["--methods", "lightning", "--phase", "nosuch", "--steps", "1", "--warmup", "1",
                            "--no-write"], "phase 'nosuch'"),
])
def test_benchmark_script_bad_input_is_one_line(tmp_path: Path, script: str, args: list[str], needle: str) -> None:
    """The benchmark scripts answer bad input as the CLI does (benchmarks/common.py's run_main)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script),
                           *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"{script}: error:") and needle in lines[0], lines[0]
