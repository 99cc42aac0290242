"""The report of a distillation run: final metrics against the teacher at the same NFE, curves, sample grids."""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from .io import atomic_write_json


#: a k-step DMD2 run's per-step diagnostics (``guidance/step2/sliced_w``, ``guidance/pooled/sliced_w``)
_PER_STEP = re.compile(r"^(?P<player>[^/]+)/(?P<which>step\d+|pooled)/(?P<metric>[^/]+)$")


def _loss_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k in row:
            if "/" in k and not k.endswith("/lr") and k not in keys and not _PER_STEP.match(k):
                keys.append(k)
    return keys


def _per_step_keys(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """``{metric: [step1 key, step2 key, ..., pooled key]}``: one plot per metric, one line per step, so a step that
    collapses while the pooled outputs look fine shows at once (issue 16)."""
    out: dict[str, list[str]] = {}
    for row in rows:
        for k in row:
            m = _PER_STEP.match(k)
            if m and k not in out.setdefault(f"{m['player']}/{m['metric']}", []):
                out[f"{m['player']}/{m['metric']}"].append(k)
    order = lambda k: (1, 0) if "/pooled/" in k else (0, int(re.search(r"/step(\d+)/", k)[1]))  # noqa: E731
    return {metric: sorted(keys, key=order) for metric, keys in out.items()}


#: curves the report shows first, with a title saying what they measure (ADD's two terms' pull on the student output)
_CURVE_TITLES = {
    "generator/grad_ratio": "ADD: lambda ||dL_distill/dx|| / ||dL_adv/dx|| on the student output",
    "generator/grad_cos": "ADD: cosine of dL_distill/dx and dL_adv/dx",
}


#: samples per model for the timing of a run without a feature network (no FID to feed)
TIMING_N = 16
#: the teacher's quality-against-NFE curve each report draws, per sampler (DDIM also at the student's steps); the
#: student is a point on that picture. Its rows are cached as the table's (:func:`_rows`).
TEACHER_CURVE: dict[str, tuple[int, ...]] = {"ddim": (1, 2, 4, 8), "heun": (8, 16, 32)}


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


# ----------------------------------------------------------------------------------------------------------------
# The teacher's rows, cached by what decides them
# ----------------------------------------------------------------------------------------------------------------
#: Bump when the metrics, the samplers or how a report measures the teacher change: cached teacher rows made before
#: are then measured again.
TEACHER_EVAL_VERSION = 1
#: files up to this size are fingerprinted by their bytes; larger ones (weights) by size and modification time
HASH_WHOLE_BYTES = 64 << 20
CACHE_FORMAT = "fewstep-teacher-eval"


def teacher_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fewstep/eval`` (default ``~/.cache/fewstep/eval``), beside the diffusers data cache."""
    from .models.hf import default_cache_dir

    return default_cache_dir().parent / "eval"


def _file_id(path: Path, whole: bool = True) -> str:
    """A file's bytes' SHA-256 (``whole`` and at most :data:`HASH_WHOLE_BYTES`), else its size and mtime."""
    st = path.stat()
    if whole and st.st_size <= HASH_WHOLE_BYTES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _tree_id(path: str | Path, whole: bool = True) -> str | None:
    """A fingerprint of a file or of every file below a folder (names and :func:`_file_id`; dot-folders such as
    ``.git`` skipped); None when ``path`` is no file or folder (an embedded name)."""
    path = Path(path)
    if path.is_file():
        return _file_id(path, whole)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(folder) / name
            h.update(f"{p.relative_to(path)}\0{_file_id(p, whole)}\n".encode())
    return h.hexdigest()


def _tensors_id(*tensors: Any) -> str:
    """A fingerprint of tensors held in memory (dtype, shape and bytes of each; None entries count as absent)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}\0{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"tensors:{h.hexdigest()}"


def _weights_id(teacher: Any) -> str:
    """The teacher's weights: a diffusers teacher's folder (weights by size and time, configs by content) and the
    dtype it was loaded in; any other teacher's state dict, tensor by tensor (name, dtype, shape, bytes)."""
    import torch

    folder = getattr(getattr(teacher, "components", None), "folder", None)
    if folder is not None:
        dtype = next((p.dtype for p in teacher.parameters()), None)
        return f"folder:{_tree_id(folder)}:{dtype}"
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"tensors:{h.hexdigest()}"


def _teacher_description(teacher: Any) -> dict[str, Any]:
    """The network, schedule, prediction, sample shape and classes, as saved beside a denoiser."""
    from .models import describe

    try:
        desc = describe(teacher)
    except TypeError:  # a network fewstep does not know how to describe: its class and what sampling uses
        desc = {"network": type(teacher.net).__name__, "schedule": teacher.schedule.to_config(),
                "prediction_type": teacher.prediction_type, "sample_shape": list(teacher.sample_shape),
                "num_classes": teacher.num_classes}
    desc.pop("meta", None)
    return desc


def _features_id(kind: str, inception_weights: Path | None) -> dict[str, Any]:
    """What measures the samples: the shipped digits (or shapes attribute) classifier's files, or the Inception
    weights file and torchmetrics' version (2-D points: the metrics alone, covered by :data:`TEACHER_EVAL_VERSION`)."""
    if kind == "digits":
        from .eval.classifier import DEFAULT_PATH

        return {"digits_classifier": [_file_id(Path(DEFAULT_PATH).with_suffix(s)) for s in (".safetensors", ".json")]}
    if kind == "shapes":
        from .data.shapes import evaluation_prompts
        from .eval.adherence import DEFAULT_PATH as SHAPES_PATH

        return {"shapes_classifier": [_file_id(SHAPES_PATH.with_suffix(s)) for s in (".safetensors", ".json")],
                "prompts": hashlib.sha256("\n".join(evaluation_prompts()).encode()).hexdigest()}
    if inception_weights is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            torchmetrics = version("torchmetrics")
        except PackageNotFoundError:
            torchmetrics = None
        return {"inception": _file_id(Path(inception_weights)), "torchmetrics": torchmetrics}
    return {}


def teacher_cache_key(teacher: Any, evaluation: dict[str, Any], weights_id: str | None = None) -> dict[str, Any]:
    """What decides a teacher row: the weights, the description (schedule, prediction...), the evaluation
    (``sampler``, ``steps``, ``cfg_scale``, ``n``, ``seed``, ``data`` and its files, the feature network, prompts)
    and :data:`TEACHER_EVAL_VERSION`."""
    return {"version": TEACHER_EVAL_VERSION, "weights": weights_id or _weights_id(teacher),
            "teacher": _teacher_description(teacher), "evaluation": evaluation}


def _cache_path(key: dict[str, Any]) -> Path:
    text = json.dumps(key, sort_keys=True, default=str)
    return teacher_cache_dir() / f"teacher_{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _cached_row(key: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The cached row and when it was measured, or None (none, unreadable, or another key)."""
    path = _cache_path(key)
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    same = json.loads(json.dumps(key, sort_keys=True, default=str))
    if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT or stored.get("key") != same:
        return None
    return stored["row"], stored["measured"]


def _store_row(key: dict[str, Any], row: dict[str, Any]) -> None:
    """Cache ``row`` (atomically); a cache that cannot be written is a warning, never a failed report."""
    from datetime import datetime, timezone

    from .errors import UserError

    measured = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = {"format": CACHE_FORMAT, "key": json.loads(json.dumps(key, sort_keys=True, default=str)),
              "row": row, "measured": measured}
    try:
        atomic_write_json(_cache_path(key), record)
    except UserError as e:
        warnings.warn(f"the teacher's rows are not cached ({e})", stacklevel=3)


def _rows(models: list[tuple[str, Any, dict[str, Any]]], teacher: Any,
          measure: Callable[[Any, dict[str, Any]], dict[str, Any]],
          evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model, ``{"model": name, **measure(model, kw)}``; a teacher's row from the cache when what decides
    it (:func:`teacher_cache_key` with ``evaluation`` and the row's ``kw``) was measured before (such a row has
    ``cached``: when), else measured and cached."""
    rows, weights_id = [], None
    for name, model, kw in models:
        if model is not teacher:
            rows.append({"model": name, **measure(model, kw)})
            continue
        weights_id = weights_id or _weights_id(teacher)
        key = teacher_cache_key(teacher, {**evaluation, **kw}, weights_id)
        hit = _cached_row(key)
        if hit is not None:
            rows.append({"model": name, **hit[0], "cached": hit[1]})
        else:
            row = measure(model, kw)
            _store_row(key, row)
            rows.append({"model": name, **row})
    return rows


def _measure_images(run_dir: Path, models: list[tuple[str, Any, dict[str, Any]]], n: int, seed: int,
                    inception_weights: str | Path | None, data: str | None, teacher: Any = None,
                    evaluation: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[str], str]:
    """Rows for images without the digits classifier: Inception FID when weights were given (``teacher``'s rows
    cached with ``evaluation``'s key parts, see :func:`_rows`), else timing only.

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
            prompts_id = hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None
            rows = _rows(models, teacher, lambda model, kw: evaluate(model, data=data, n=n, seed=seed,
                                                                     inception_weights=weights, prompts=prompts, **kw),
                         {**(evaluation or {}), "features": _features_id("image", weights), "prompts": prompts_id})
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


def _frontier(run_dir: Path, rows: list[dict[str, Any]], metric: str, steps: int) -> list[dict[str, Any]]:
    """Write ``nfe_curve.json`` (the teacher's rows along :data:`TEACHER_CURVE` and the student's) and its picture
    ``nfe_curve.png``; return the rows in the report's order (teacher by sampler and NFE, then the student)."""
    from .eval.images import plot_nfe_frontier

    teacher = sorted((r for r in rows[1:] if r.get(metric) is not None), key=lambda r: (r["sampler"], r["nfe"]))
    student = {**rows[0], "sampler": "student", "steps": steps}
    atomic_write_json(run_dir / "nfe_curve.json", [*teacher, student])  # every metric measured, for readers
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in teacher:
        curves.setdefault(r["sampler"], []).append((r["nfe"], r[metric]))
    plot_nfe_frontier(curves, [(f"student ({steps} step{'s' if steps > 1 else ''})", student["nfe"],
                                student.get(metric), None)], run_dir / "nfe_curve.png", metric=metric,
                      title=f"{metric} against NFE: the teacher per sampler, the student a point")
    keep = ["model", "sampler", "steps", "nfe", metric, "seconds_per_1000"]
    return [{k: r.get(k) for k in keep} for r in [*teacher, student]]


def write_run_report(run_dir: Path, student: Any, teacher: Any, n: int = 1000, seed: int = 0,
                     inception_weights: str | Path | None = None, data: Any = None,
                     cfg_scale: float = 1.0) -> Path:
    """Evaluate ``student`` and ``teacher`` (DDIM with the student's step count, and Heun with 32 steps), write
    ``eval.json`` and ``report.html`` into ``run_dir``; return the report's path. Where a quality metric exists the
    teacher is also measured along :data:`TEACHER_CURVE`: ``nfe_curve.json`` and ``nfe_curve.png`` (its curve per
    sampler, the student a point). The report embeds every picture, so it can be sent alone.

    ``data`` is the run's data (default: the student's recorded data): every row is measured against it, the
    teacher's too (a diffusers teacher records none). Data in memory (a ``fewstep.data.Dataset`` from
    :func:`fewstep.api.as_dataset`) is measured as given; its images as any images other than digits.
    ``cfg_scale``: the guidance the student was distilled with;
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
    in_memory = data is not None and not isinstance(data, (str, Path))
    kind = "image" if in_memory and _kind(student) == "digits" else _kind(student)  # no digits classifier on them
    if data == "shapes" and _is_text_model(student):  # the shapes attribute classifier measures them
        kind = "shapes"
    if kind != "image" or _inception_weights(inception_weights)[0] is not None:  # a quality to draw against NFE
        settings = {(s, k) for s, ks in TEACHER_CURVE.items() for k in ks} | {("ddim", student.steps)}
        models += [(f"teacher ({s}, {k} steps)", teacher, {"steps": k, "sampler": s, **guide})
                   for s, k in sorted(settings) if (s, k) not in {("ddim", student.steps), ("heun", 32)}]
    note = ""
    # what, besides the teacher and its sampling, decides a teacher row (the cache's key)
    evaluation = {"n": n, "seed": seed, "data": data.name if in_memory else data,
                  "data_files": (_tensors_id(data.x, data.labels) if in_memory
                                 else _tree_id(data, whole=False) if data else None)}
    if kind == "image":
        rows, metric_keys, note = _measure_images(run_dir, models, n, seed, inception_weights, data, teacher,
                                                  evaluation)
    else:
        from .data.shapes import evaluation_prompts

        prompts = {"prompts": evaluation_prompts()} if kind == "shapes" else {}
        rows = _rows(models, teacher, lambda model, kw: evaluate(model, data=data, n=n, seed=seed, **prompts, **kw),
                     {**evaluation, "features": _features_id(kind, None)})
        metric_keys = {"digits": ["fid", "fid_heldout", "precision", "recall", "class_accuracy"],
                       "shapes": ["fid", "adherence", "adherence_seen", "adherence_heldout", "precision", "recall"]
                       }.get(kind, ["sliced_w", "modes_covered", "high_quality"])
    rows, extra = rows[:3], rows[3:]  # the table's rows; the rest only draw the teacher's curve
    rows[0]["steps"] = student.steps
    atomic_write_json(run_dir / "eval.json", rows)
    table = [{k: r.get(k) for k in ["model", "steps", "nfe", *metric_keys, "seconds_per_1000"]} for r in rows]
    frontier = _frontier(run_dir, rows + extra, metric_keys[0], student.steps) if metric_keys else []

    metrics_path = run_dir / "metrics.jsonl"
    metrics_rows = ([json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                    if metrics_path.is_file() else [])
    curve_images = []
    for key in _loss_keys(metrics_rows):
        name = key.replace("/", "_")
        plot_curves(metrics_rows, [key], run_dir / "curves" / f"{name}.png", x="it", title=_CURVE_TITLES.get(key, key))
        curve_images.insert(len(curve_images) if key not in _CURVE_TITLES else 0, (key, f"curves/{name}.png"))
    for metric, keys in _per_step_keys(metrics_rows).items():  # each student step's output over training
        name = "per_step_" + metric.replace("/", "_")
        plot_curves(metrics_rows, keys, run_dir / "curves" / f"{name}.png", x="it",
                    title=f"{metric.split('/')[-1]} of each student step's output (and of all steps pooled)")
        curve_images.insert(0, (f"per step: {metric.split('/')[-1]}", f"curves/{name}.png"))
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    cfg = yaml.safe_load(config_text) if config_text else {}
    against = {"digits": "the train split (fid_heldout: the held-out split, the memorisation check)",
               "points": "the held-out split",
               "shapes": "real drawings of the same prompts, on the shapes attribute classifier's features (one "
                         "prompt per composition cycled, the 32 held out of training first; adherence: the share "
                         "of samples whose four attributes the classifier reads as the prompt names)"
               }.get(kind, "the held-out split")
    measured = (f"{n} samples each, measured against {against}." if kind != "image" or metric_keys
                else "NFE and sampling time per model.")
    text = (f"{cfg.get('method', 'student')} student of teacher {cfg.get('teacher')} on {cfg.get('data') or data}, "
            f"{measured}")
    if guide and cfg_scale != 1.0:
        text += f" The teacher rows sample with CFG scale {cfg_scale:g}, the guidance the student was distilled with."
    cached = sorted({r["cached"] for r in rows if r.get("cached")})
    if cached:
        text += (f" Teacher rows from the cache, measured {' and '.join(cached)} (the same teacher weights, sampling, "
                 f"samples, seed, data and metrics; their timing is from then; {teacher_cache_dir()} holds them, "
                 "delete it to measure again).")
    sections = [
        {"heading": "Result", "text": text + (f"\n\n{note}" if note else ""), "table": table},
        *([{"heading": f"{metric_keys[0]} against NFE",
            "text": f"The teacher's curve per sampler ({n} samples a point, the same seed) and the student as a "
                    "point at its own NFE; nfe_curve.json holds the numbers.",
            "table": frontier, "images": [(f"{metric_keys[0]} against NFE", "nfe_curve.png")]}] if frontier else []),
        {"heading": "Training curves", "images": curve_images},
        {"heading": "Samples over training", "images": [(g.stem.replace("_", " "), f"samples/{g.name}") for g in grids]},
        {"heading": "Resolved config", "code": config_text},
    ]
    return write_report(run_dir / "report.html", f"fewstep {cfg.get('method', '')} run: {run_dir.name}", sections)
