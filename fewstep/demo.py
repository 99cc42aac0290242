"""``fewstep demo``: the embedded default end to end on a CPU -- teacher, samples, evaluation, report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import UserError
from .io import atomic_write_json

# The teacher at falling step counts: the problem a few-step student solves is visible as FID rising at low NFE.
TEACHER_SETTINGS = [("ddim", 1), ("ddim", 2), ("ddim", 4), ("ddim", 8), ("heun", 16), ("heun", 32)]


def _teacher(out: Path) -> Any:
    from . import zoo
    from .api import load_teacher

    try:
        return load_teacher("digits")
    except UserError:  # no shipped weights (e.g. deleted): train them from the preset
        from .config import TeacherConfig
        from .train.teacher import train_teacher

        cfg = TeacherConfig.model_validate(zoo.PRESETS["digits"])
        return load_teacher(train_teacher(cfg, out / "teacher").parent)


def _last_grid(run_dir: Path) -> str:
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    return str(grids[-1].relative_to(run_dir.parent)) if grids else ""


DEMO_DISTILL_ITERATIONS = 1500  # DMD2's default budget; the whole demo takes about 7 minutes on 2 CPU cores


def run_demo(out: Path, n: int = 1000, seed: int = 0, distill_iterations: int = DEMO_DISTILL_ITERATIONS) -> Path:
    """Run the demo into ``out`` (which must not exist) and return the path of its HTML report.

    Args:
        out: the demo's directory.
        n: samples per evaluation.
        seed: sampling seed.
        distill_iterations: DMD2 iterations (default: the same budget as `fewstep distill`).
    """
    from .api import check_sample_count, generate
    from .data import load_data
    from .eval.evaluate import evaluate_against
    from .eval.images import plot_curves, save_grid
    from .eval.report import write_report

    out = Path(out)
    test = load_data("digits", "test")
    check_sample_count(n, tuple(test.sample_shape))  # before anything is made
    out.mkdir(parents=True)
    teacher = _teacher(out)
    rows: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for sampler, steps in tqdm(TEACHER_SETTINGS, desc="teacher", unit="setting"):
        x, labels, timing = generate(teacher, n, steps=steps, sampler=sampler, seed=seed)
        metrics = evaluate_against(x, "digits", labels=labels)
        rows.append({"model": "teacher", "sampler": sampler, "steps": steps, **timing, **metrics})
        rel = f"samples/teacher_{sampler}_{steps}.png"
        save_grid(x[:100], out / rel, nrow=10)
        images.append((f"teacher, {sampler}, {steps} steps (NFE {timing['nfe']})", rel))
    # The distilled student: DMD2, one step, from the same teacher.
    from .distillation import distill

    student = distill("digits", "dmd2", steps=1, out=out / "dmd2", iterations=distill_iterations, evaluate_n=0,
                      seed=seed)
    x, labels, timing = generate(student, n, seed=seed)
    metrics = evaluate_against(x, "digits", labels=labels)
    rows.append({"model": "DMD2 student", "sampler": "student", "steps": 1, **timing, **metrics})
    save_grid(x[:100], out / "samples/dmd2_1step.png", nrow=10)
    images.insert(0, (f"DMD2 student, 1 step (NFE {timing['nfe']})", "samples/dmd2_1step.png"))
    atomic_write_json(out / "metrics.json", rows)
    teacher_rows = [r for r in rows if r["model"] == "teacher"]
    plot_curves(teacher_rows, ["fid"], out / "fid_vs_nfe.png", x="nfe", title="digits teacher: FID against NFE")
    keys = ["model", "sampler", "steps", "nfe", "fid", "precision", "recall", "class_accuracy", "seconds_per_1000"]
    sections = [
        {"heading": "The teacher at falling step counts, and a one-step DMD2 student",
         "text": "Domain FID (features of fewstep's digits classifier) against the held-out split, with k-NN "
                 "precision/recall and class consistency. Few steps collapse the teacher's quality: the problem "
                 "a distilled few-step student solves. The DMD2 run directory dmd2/ holds its resolved config, "
                 "metrics.jsonl, checkpoints and sample grids over training.",
         "table": [{k: r.get(k) for k in keys} for r in rows],
         "images": [("FID against NFE", "fid_vs_nfe.png")]},
        {"heading": "Samples (one column per class)", "images": images},
        {"heading": "The DMD2 run", "text": "Training curves, sample grids over training and the resolved config.",
         "images": [("DMD2 samples at the end of training", _last_grid(out / "dmd2"))]},
    ]
    return write_report(out / "report.html", "fewstep demo: digits", sections)
