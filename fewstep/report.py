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


#: samples per model for the timing of a run without a feature network (no FID to feed)
TIMING_N = 16


def _kind(model: Any) -> str:
    """``points``, ``digits`` (the shipped domain classifier measures them) or ``image`` (any other image)."""
    from .eval.evaluate import DIGITS_SHAPES
    from .models.hf import image_shape

    shape = tuple(image_shape(model))
    if len(shape) != 3:
        return "points"
    return "digits" if shape in DIGITS_SHAPES else "image"


def _inception_weights(weights: str | Path | None) -> tuple[Path | None, str]:
    """The Inception weights the user gave (argument or ``$FEWSTEP_INCEPTION_WEIGHTS``), or None and why not."""
    import os

    from .errors import UserError
    from .eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, resolve_weights_path

    if weights is None and not os.environ.get(WEIGHTS_ENV):
        return None, (f"no Inception weights were given: pass --inception-weights FILE to fewstep distill (or set "
                      f"{WEIGHTS_ENV}=FILE), FILE being {WEIGHTS_FILE}")
    try:
        return resolve_weights_path(weights), ""
    except UserError as e:
        return None, str(e)


def _test_prompts(model: Any, data: str | None) -> list[str] | None:
    """Text-to-image models measured on an image folder: the held-out split's captions."""
    from .api import _is_text_model

    if not _is_text_model(model) or data is None or not Path(data).is_dir():
        return None
    from .data.folder import folder_split_files

    try:
        return folder_split_files(data, "test")[1]
    except Exception:  # noqa: BLE001 -- no captions, no test split: the empty prompt
        return None


def _measure_images(run_dir: Path, models: list[tuple[str, Any, dict[str, Any]]], n: int, seed: int,
                    inception_weights: str | Path | None, data: str | None
                    ) -> tuple[list[dict[str, Any]], list[str], str]:
    """Rows for images without the digits classifier: Inception FID when weights were given, else timing only.

    Returns the rows, the metric columns and a note for the report (which metric is missing and how to get it)."""
    from .api import evaluate, generate
    from .errors import UserError

    weights, why = _inception_weights(inception_weights)
    run = str(run_dir)
    how = (f"Measure it after training with `fewstep eval --model {run} --data {data} --inception "
           f"--inception-weights FILE`")
    shape = models[0][1].sample_shape
    if weights is not None:
        prompts = _test_prompts(models[0][1], data)
        try:
            rows = [{"model": name, **evaluate(model, data=data, n=n, seed=seed, inception_weights=weights,
                                               prompts=prompts, **kw)} for name, model, kw in models]
            note = (f"FID is Inception FID (torchmetrics' Inception-v3, {weights.name}) on {n} samples against the "
                    "held-out split" + (", the text-to-image models sampled on its captions" if prompts else "")
                    + ". The digits classifier's domain FID, precision, recall and class accuracy exist for digits "
                      "only.")
            return rows, ["inception_fid"], note
        except UserError as e:  # e.g. torchmetrics missing: the run still gets its report
            why = str(e)
    rows = []
    for name, model, kw in models:
        _, _, timing = generate(model, min(n, TIMING_N), seed=seed, **kw)
        rows.append({"model": name, **timing, "steps": getattr(model, "steps", kw.get("steps"))})
    note = (f"FID: not measured. There is no domain feature network for images of shape {tuple(shape)} (the "
            f"shipped classifier measures digits only) and {why}. {how} (for images of 299 px or more add "
            "--patch-fid; for text-to-image models --clip DIR --prompts FILE adds CLIP score). Timing below is from "
            f"{min(n, TIMING_N)} samples per model.")
    return rows, [], note


def write_run_report(run_dir: Path, student: Any, teacher: Any, n: int = 1000, seed: int = 0,
                     inception_weights: str | Path | None = None, data: str | None = None,
                     cfg_scale: float = 1.0) -> Path:
    """Evaluate ``student`` and ``teacher`` (DDIM with the student's step count, and Heun with 32 steps), write
    ``eval.json`` and ``report.html`` into ``run_dir``; return the report's path.

    ``data`` is the run's data (default: the student's recorded data): every row is measured against it, the
    teacher's too (a diffusers teacher records none). ``cfg_scale``: the guidance the student was distilled with;
    a conditional teacher is sampled with it, so the rows compare the student with the distribution it imitates.

    Digits are measured with the shipped classifier's features (FID, precision, recall, class accuracy) and 2-D data
    with sliced Wasserstein distance and mode coverage. Any other images (a diffusers teacher's, an image folder's)
    get Inception FID when ``inception_weights`` (or ``$FEWSTEP_INCEPTION_WEIGHTS``) names the weights file;
    without it the report says which metric is missing and how to get it, and keeps NFE and timing, the training
    curves and the sample grids.
    """
    from .api import evaluate
    from .eval.images import plot_curves
    from .eval.report import write_report

    from .api import _is_text_model, model_data

    run_dir = Path(run_dir)
    data = data or model_data(student)
    guide = {"cfg_scale": float(cfg_scale)} if teacher.num_classes > 0 or _is_text_model(teacher) else {}
    models = [("student", student, {}),
              ("teacher (ddim)", teacher, {"steps": student.steps, "sampler": "ddim", **guide}),
              ("teacher (heun)", teacher, {"steps": 32, "sampler": "heun", **guide})]
    kind = _kind(student)
    note = ""
    if kind == "image":
        rows, metric_keys, note = _measure_images(run_dir, models, n, seed, inception_weights, data)
    else:
        rows = [{"model": name, **evaluate(model, data=data, n=n, seed=seed, **kw)} for name, model, kw in models]
        metric_keys = (["fid", "precision", "recall", "class_accuracy"] if kind == "digits"
                       else ["sliced_w", "modes_covered", "high_quality"])
    rows[0]["steps"] = student.steps
    atomic_write_json(run_dir / "eval.json", rows)
    table = [{k: r.get(k) for k in ["model", "steps", "nfe", *metric_keys, "seconds_per_1000"]} for r in rows]

    metrics_path = run_dir / "metrics.jsonl"
    metrics_rows = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                    if metrics_path.is_file() else [])
    curve_images = []
    for key in _loss_keys(metrics_rows):
        name = key.replace("/", "_")
        plot_curves(metrics_rows, [key], run_dir / "curves" / f"{name}.png", x="it", title=key)
        curve_images.append((key, f"curves/{name}.png"))
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    cfg = yaml.safe_load(config_text) if config_text else {}
    measured = (f"{n} samples each, measured against the held-out split." if kind != "image" or metric_keys
                else "NFE and sampling time per model.")
    text = (f"{cfg.get('method', 'student')} student of teacher {cfg.get('teacher')} on {cfg.get('data') or data}, "
            f"{measured}")
    if guide and cfg_scale != 1.0:
        text += f" The teacher rows sample with CFG scale {cfg_scale:g}, the guidance the student was distilled with."
    sections = [
        {"heading": "Result", "text": text + (f"\n\n{note}" if note else ""), "table": table},
        {"heading": "Training curves", "images": curve_images},
        {"heading": "Samples over training", "images": [(g.stem.replace("_", " "), f"samples/{g.name}") for g in grids]},
        {"heading": "Resolved config", "code": config_text},
    ]
    return write_report(run_dir / "report.html", f"fewstep {cfg.get('method', '')} run: {run_dir.name}", sections)
