"""``fewstep demo``: the embedded default end to end on a CPU -- teacher, samples, evaluation, report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import UserError
from .io import atomic_write_json



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
#: samples in each grid of the demo's report (one row per ten classes)
GRID_N = 100


def run_demo(out: Path, n: int = 1000, seed: int = 0, distill_iterations: int = DEMO_DISTILL_ITERATIONS) -> Path:
    """Run the demo into ``out`` (which must not exist) and return the path of its HTML report.

    The DMD2 run directory ``out/dmd2`` gets the report every run gets (``eval.json``, ``nfe_curve.json``,
    ``report.html``); the demo's own report shows that run's numbers (the teacher at falling step counts, the
    student beside it) with sample grids of each.

    Args:
        out: the demo's directory.
        n: samples per evaluation.
        seed: sampling seed.
        distill_iterations: DMD2 iterations (default: the same budget as `fewstep distill`).
    """
    import json

    from .api import check_sample_count, generate
    from .data import load_data
    from .eval.images import save_grid
    from .eval.report import write_report
    from .report import write_run_report

    out = Path(out)
    test = load_data("digits", "test")
    check_sample_count(n, tuple(test.sample_shape))  # before anything is made
    out.mkdir(parents=True)
    teacher = _teacher(out)
    # The distilled student: DMD2, one step, from the same teacher; its run's report measures both (the teacher at
    # falling step counts: the problem a few-step student solves is visible as FID rising at low NFE).
    from .distillation import distill

    student = distill("digits", "dmd2", steps=1, out=out / "dmd2", iterations=distill_iterations, evaluate_n=0,
                      seed=seed)
    write_run_report(out / "dmd2", student, teacher, n=n, seed=seed, data="digits",
                     cfg_scale=student.info["meta"]["guidance_scale"])
    curve = json.loads((out / "dmd2" / "nfe_curve.json").read_text())  # the teacher's rows, then the student's
    rows = [{**r, "model": "DMD2 student" if r["sampler"] == "student" else "teacher"} for r in curve]
    images: list[tuple[str, str]] = []
    for r in tqdm(rows, desc="sample grids", unit="model"):
        model = student if r["sampler"] == "student" else teacher
        kw = {} if model is student else {"steps": r["steps"], "sampler": r["sampler"], "cfg_scale": r["cfg_scale"]}
        x, _, _ = generate(model, min(n, GRID_N), seed=seed, **kw)
        rel = ("samples/dmd2_1step.png" if model is student else f"samples/teacher_{r['sampler']}_{r['steps']}.png")
        save_grid(x, out / rel, nrow=10)
        how = "" if model is student else f" {r['sampler']},"
        images.append((f"{r['model']},{how} {r['steps']} step{'s' if r['steps'] > 1 else ''} (NFE {r['nfe']})", rel))
    images.insert(0, images.pop())  # the student first
    atomic_write_json(out / "metrics.json", rows)
    keys = ["model", "sampler", "steps", "nfe", "fid", "fid_heldout", "precision", "recall", "class_accuracy",
            "seconds_per_1000"]
    sections = [
        {"heading": "The teacher at falling step counts, and a one-step DMD2 student",
         "text": f"{n} samples each. Domain FID (features of fewstep's digits classifier) against the train split, "
                 "fid_heldout against the held-out split (the memorisation check), with k-NN precision/recall and "
                 "class consistency. Few steps collapse the teacher's quality: the problem a distilled few-step "
                 "student solves. The DMD2 run directory dmd2/ holds its own report.html and eval.json, its "
                 "resolved config, metrics.jsonl, checkpoints and sample grids over training.",
         "table": [{k: r.get(k) for k in keys} for r in rows],
         "images": [("FID against NFE: the teacher per sampler, the student a point", "dmd2/nfe_curve.png")]},
        {"heading": "Samples (one column per class)", "images": images},
        {"heading": "The DMD2 run", "text": "dmd2/report.html shows its training curves, sample grids over training "
                                            "and resolved config.",
         "images": [("DMD2 samples at the end of training", _last_grid(out / "dmd2"))]},
    ]
    return write_report(out / "report.html", "fewstep demo: digits", sections)
