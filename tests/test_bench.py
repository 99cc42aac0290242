"""``fewstep bench``: a tiny plan writes bench.json in the one result shape and a self-contained report.html; a second
invocation trains and measures nothing again; an interrupted plan resumes its half-finished run from its checkpoint;
bad options are one line and exit status 2."""
from __future__ import annotations

import html.parser
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewstep.api
import fewstep.bench.profile
import fewstep.distillation
from fewstep import cli
from fewstep.bench import make_plan, run_bench
from fewstep.bench.runs import CONFIGS, load_run_student, train_run
from fewstep.train import loop

TINY = dict(data="grid25", methods="dmd2,add", steps="1", seeds=1, n=40, iterations=3, teacher_steps="1,2",
            profile_steps=2, profile_warmup=1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny plan, run once for the tests of this module: ``(out, result)``."""
    out = tmp_path_factory.mktemp("bench") / "b"
    return out, run_bench(make_plan(out, **TINY), progress=False)


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links.extend((tag, k, v) for k, v in attrs if k in ("src", "href") and v is not None)


def test_tiny_plan_writes_the_result_shape_and_a_self_contained_report(bench):
    out, result = bench
    assert json.loads((out / "bench.json").read_text()) == result
    m = result["meta"]
    assert {"command", "date", "machine", "torch", "seeds"} <= set(m) and m["seeds"] == [0] and m["n"] == 40
    teacher = [r for r in result["rows"] if r["method"] == "teacher"]
    students = [r for r in result["rows"] if r["method"] != "teacher"]
    assert sorted((r["variant"], r["steps"]) for r in teacher) == sorted(
        (s, k) for s in ("ddim", "euler", "heun") for k in (1, 2))
    assert [r["nfe"] for r in teacher if r["variant"] == "heun"] == [1, 3]  # Heun: 2 steps - 1 evaluations
    assert [(r["method"], r["steps"], r["nfe"], r["iterations"]) for r in students] == [("dmd2", 1, 1, 3),
                                                                                        ("add", 1, 1, 3)]
    for r in result["rows"]:
        assert r["data"] == "grid25" and r["sliced_w"] > 0 and "fid" not in r and r["seconds_per_1000"] > 0
    for r in students:
        assert r["wall_seconds"] > 0 and r["peak_memory_gb"] > 0
        # profiled: a share of the step, and the largest other costs named with their milliseconds
        assert 0 < r["step_efficiency"] < 1 and r["top_non_network"].count(" ms") >= 3
    assert all(r.get("step_efficiency") is None for r in teacher)
    assert m["profile"] == {"warmup": 1, "steps": 2}

    page = _Page()
    page.feed((out / "report.html").read_text())
    images = [v for tag, k, v in page.links if tag == "img"]
    # the frontier, the teacher at 1, 4 and 63 NFE and the two students from the same noise, the convergence curves
    assert len(images) == 1 + 3 + 2 + 1
    assert all(v.startswith("data:image/png;base64,") for _, _, v in page.links)  # nothing outside the page
    assert "table" in page.tags and "script" not in page.tags
    for name in ("frontier_grid25.png", "convergence_grid25.png", "samples/grid25_dmd2_1-step.png",
                 "samples/grid25_teacher_heun_32_steps.png"):
        assert (out / name).is_file()


def test_a_second_invocation_trains_and_measures_nothing(bench, monkeypatch):
    out, result = bench
    calls = []
    for module, name in ((fewstep.distillation, "distill"), (fewstep.api, "evaluate"),
                         (fewstep.bench.profile, "measure_steps")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    students = sorted(out.glob("runs/*/run/student.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in students]
    again = run_bench(make_plan(out, **TINY), progress=False)
    assert calls == []
    assert len(students) == 2 and [p.stat().st_mtime_ns for p in students] == mtimes
    assert again["rows"] == result["rows"]


def test_tables_print_from_bench_json(bench, capsys):
    out, _ = bench
    assert cli.main(["bench", "--tables", str(out / "bench.json")]) == 0
    text = capsys.readouterr().out
    assert "**grid25** (sliced W; lower is better)" in text and "| sampler | NFE 1 | NFE 2 | NFE 4 |" in text
    assert "| dmd2 | 1 | 1 |" in text and "| add | 1 | 1 |" in text


def test_an_interrupted_plan_resumes_its_run_from_the_checkpoint(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    text = (CONFIGS / "add_grid25.yaml").read_text()
    assert "checkpoint_every: 500" in text
    (configs / "add_grid25.yaml").write_text(text.replace("checkpoint_every: 500", "checkpoint_every: 2"))
    options = dict(data="grid25", methods="add", steps="1", seeds=1, n=20, iterations=4, teacher_steps="1",
                   config_dir=configs, profile_steps=0)
    plan = make_plan(tmp_path / "b", **options)
    real = loop._save_checkpoint

    def save_then_stop(run, step):
        real(run, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_bench(plan, progress=False)
    (run,) = plan.runs
    assert [p.name for p in loop.list_checkpoints(run.run_dir)] == ["step_00000002.pt"] and not run.finished()
    monkeypatch.setattr(loop, "_save_checkpoint", real)
    run_bench(make_plan(tmp_path / "b", **options), progress=False)
    assert json.loads(run.record_path.read_text())["resumed"] is True
    # the resumed student equals one trained without interruption
    (fresh,) = make_plan(tmp_path / "fresh", **options).runs
    train_run(fresh, code="")
    a, b = load_file(run.run_dir / "student.safetensors"), load_file(fresh.run_dir / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lightning_rungs_are_profiled_in_the_phase_that_trains_them(tmp_path):
    from fewstep.bench.runs import _lightning_phase

    (run,) = make_plan(tmp_path / "b", data="grid25", methods="lightning", steps="1,2,4", seeds=1).runs
    cfg = run.config
    kinds = [(s, k) for s in range(len(cfg.stages())) for k in cfg.phase_kinds(s)]
    for steps in (1, 2, 4):
        j = _lightning_phase(cfg, steps)
        stage = kinds[j][0]
        assert cfg.stages()[stage] == steps  # the rung's own stage ...
        assert j + 1 == len(kinds) or kinds[j + 1][0] != stage  # ... in its last phase
    assert _lightning_phase(cfg, 1) == len(kinds) - 1


@pytest.mark.parametrize("args, message", [
    (["--methods", "dmd2,foo"], "unknown method 'foo'"),
    (["--steps", "1,0"], "--steps must be from 1 to 8, got 0"),
    (["--seeds", "0"], "--seeds must be from 1 to 1000, got 0"),
    (["--data", "mnist"], "--data 'mnist'"),
    (["--profile-steps", "-1"], "--profile-steps must be from 0 to 10000, got -1"),
    ([], None),  # no --out
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = ["--out", str(tmp_path / "b")] if args else []
    assert cli.main(["bench", *args, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewstep: error: ") and (message or "--out") in err
    assert not Path(tmp_path / "b").exists()


def test_frontier_colours_a_method_and_sets_methods_apart(tmp_path: Path, monkeypatch) -> None:
    """The bench's frontier: one colour per method (its step counts by marker), and two methods at the same NFE drawn
    a little apart along NFE, so that neither hides the other."""
    from matplotlib.axes import Axes

    from fewstep.eval.images import plot_nfe_frontier

    drawn = []
    real = Axes.errorbar

    def spy(self, x, y, *args, **kw):
        drawn.append((kw["label"], x[0], kw["color"], kw["fmt"]))
        return real(self, x, y, *args, **kw)

    monkeypatch.setattr(Axes, "errorbar", spy)
    points = [("dmd2 1-step", 1, 0.05, 0.01), ("dmd2 4-step", 4, 0.04, 0.01), ("add 1-step", 1, 0.03, None)]
    path = plot_nfe_frontier({"ddim": [(1, 0.6), (4, 0.3)]}, points, tmp_path / "f.png", metric="sliced W",
                             groups=["dmd2", "dmd2", "add"])
    assert path.stat().st_size > 0
    (_, x1, c1, m1), (_, x4, c4, m4), (_, xa, ca, _) = drawn
    assert c1 == c4 != ca and m1 != m4
    assert x1 < 1 < xa and x4 < 4 and abs(x1 - xa) / 1 < 0.1  # apart, yet both within a tenth of an octave of NFE 1
    with pytest.raises(ValueError, match="groups"):
        plot_nfe_frontier({}, points, tmp_path / "g.png", groups=["dmd2"])


def test_add_trains_one_run_per_seed_and_samples_it_at_every_step_count(tmp_path):
    """ADD trains at its student_times whatever its steps (they only choose the sampler's times): its 1- and 4-step
    configs train the same weights, so the bench trains one run, at the most steps, and samples it at each."""
    options = dict(data="grid25", methods="add", seeds=1, n=20, iterations=3, teacher_steps="1", profile_steps=0)
    (run,) = make_plan(tmp_path / "b", steps="1,2,4", **options).runs
    (one,) = make_plan(tmp_path / "b1", steps="1", **options).runs
    (four,) = make_plan(tmp_path / "b4", steps="4", **options).runs
    assert (run.steps, run.students, run.key) == (4, (1, 2, 4), four.key)
    for r in (run, one):
        train_run(r, code="")
    a, b = (load_file(r.run_dir / "student.safetensors") for r in (run, one))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    students = [load_run_student(run, k) for k in (1, 2, 4)]
    assert [s.timesteps.tolist() for s in students] == [[999], [999, 499], [999, 749, 499, 249]]
    # the shared run's 1-step student is the 1-step config's own
    assert torch.equal(students[0].sample(8, seed=3), load_run_student(one, 1).sample(8, seed=3))
