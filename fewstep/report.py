"""The report of a distillation run: final metrics against the teacher at the same NFE, curves, sample grids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_json


def _loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k in row:
            if "/" in k and not k.endswith("/lr") and k not in keys:
                keys.append(k)
    return keys


def write_run_report(run_dir: Path, student: Any, teacher: Any, n: int = 1000, seed: int = 0) -> Path:
    """Evaluate ``student`` and ``teacher`` (DDIM with the student's step count, and Heun with 32 steps), write
    ``eval.json`` and ``report.html`` into ``run_dir``; return the report's path."""
    from .api import evaluate
    from .eval.images import plot_curves
    from .eval.report import write_report

    run_dir = Path(run_dir)
    rows = [
        {"model": "student", "steps": student.steps, **evaluate(student, n=n, seed=seed)},
        {"model": "teacher (ddim)", **evaluate(teacher, n=n, steps=student.steps, sampler="ddim", seed=seed)},
        {"model": "teacher (heun)", **evaluate(teacher, n=n, steps=32, sampler="heun", seed=seed)},
    ]
    atomic_write_json(run_dir / "eval.json", rows)
    image = rows[0].get("fid") is not None
    metric_keys = (["fid", "precision", "recall", "class_accuracy"] if image
                   else ["sliced_w", "modes_covered", "high_quality"])
    table = [{k: r.get(k) for k in ["model", "steps", "nfe", *metric_keys, "seconds_per_1000"]} for r in rows]

    metrics_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve_images = []
    for key in _loss_keys(metrics_rows):
        name = key.replace("/", "_")
        plot_curves(metrics_rows, [key], run_dir / "curves" / f"{name}.png", x="it", title=key)
        curve_images.append((key, f"curves/{name}.png"))
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    cfg = yaml.safe_load(config_text) if config_text else {}
    sections = [
        {"heading": "Result", "text": f"{cfg.get('method', 'student')} student of teacher {cfg.get('teacher')} on "
                                       f"{cfg.get('data')}, {n} samples each, measured against the held-out split.",
         "table": table},
        {"heading": "Training curves", "images": curve_images},
        {"heading": "Samples over training", "images": [(g.stem.replace("_", " "), f"samples/{g.name}") for g in grids]},
        {"heading": "Resolved config", "code": config_text},
    ]
    return write_report(run_dir / "report.html", f"fewstep {cfg.get('method', '')} run: {run_dir.name}", sections)
