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


def run_demo(out: Path, n: int = 1000, seed: int = 0) -> Path:
    """Run the demo into ``out`` (which must not exist) and return the path of its HTML report."""
    from .api import generate
    from .data import load_data
    from .eval.evaluate import evaluate_samples
    from .eval.images import plot_curves, save_grid
    from .eval.report import write_report

    out = Path(out)
    out.mkdir(parents=True)
    teacher = _teacher(out)
    test = load_data("digits", "test")
    rows: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for sampler, steps in tqdm(TEACHER_SETTINGS, desc="teacher", unit="setting"):
        x, labels, timing = generate(teacher, n, steps=steps, sampler=sampler, seed=seed)
        metrics = evaluate_samples(x, test, labels=labels)
        rows.append({"model": "teacher", "sampler": sampler, "steps": steps, **timing, **metrics})
        rel = f"samples/teacher_{sampler}_{steps}.png"
        save_grid(x[:100], out / rel, nrow=10)
        images.append((f"teacher, {sampler}, {steps} steps (NFE {timing['nfe']})", rel))
    atomic_write_json(out / "metrics.json", rows)
    plot_curves(rows, ["fid"], out / "fid_vs_nfe.png", x="nfe", title="digits teacher: FID against NFE")
    keys = ["model", "sampler", "steps", "nfe", "fid", "precision", "recall", "class_accuracy", "seconds_per_1000"]
    sections = [
        {"heading": "The teacher at falling step counts",
         "text": "Domain FID (features of fewstep's digits classifier) against the held-out split, with k-NN "
                 "precision/recall and class consistency. Few steps collapse the teacher's quality: the problem "
                 "a distilled few-step student solves.",
         "table": [{k: r.get(k) for k in keys} for r in rows],
         "images": [("FID against NFE", "fid_vs_nfe.png")]},
        {"heading": "Samples (one column per class)", "images": images},
    ]
    return write_report(out / "report.html", "fewstep demo: digits", sections)
