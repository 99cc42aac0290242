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


def _dmd2_run_section(out: Path) -> dict[str, Any]:
    """The demo report's last section: where the DMD2 run's own report is, and its last sample grid."""
    return {"heading": "The DMD2 run", "text": "dmd2/report.html shows its training curves, sample grids over training "
                                               "and resolved config.",
            "images": [("DMD2 samples at the end of training", _last_grid(out / "dmd2"))]}


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
        _dmd2_run_section(out),
    ]
    return write_report(out / "report.html", "fewstep demo: digits", sections)


# ----------------------------------------------------------------------------------------------------------------
# fewstep demo --text: the embedded text-to-image teacher (shapes)
# ----------------------------------------------------------------------------------------------------------------
#: DMD2 iterations of the text demo's student: about 6-7 minutes of the demo's 10 on 2 CPU cores (0.4-0.6 s each)
TEXT_DEMO_ITERATIONS = 800
#: samples per evaluation: one per composition (the 32 held out of training, then the 96 seen)
TEXT_DEMO_N = 128
#: configs/dmd2_shapes.yaml's settings beyond DMD2's defaults (tests/test_cli.py checks that they agree)
DMD2_SHAPES = {"batch_size": 32}
#: the teacher's guided row: CFG makes adherence exact and costs FID (README, the shapes teacher measured)
TEXT_DEMO_CFG = 3.0
GRID_PROMPTS = 8  # prompts (rows) of each grid
GRID_NOISE = 4  # noise draws (columns) per prompt and model


def _spread(prompts: list[str]) -> list[str]:
    """:data:`GRID_PROMPTS` of ``prompts`` (ordered by shape, colour, position, size) that vary every attribute."""
    step = len(prompts) // GRID_PROMPTS
    return [prompts[i * step + (3 * i) % step] for i in range(GRID_PROMPTS)]


def _prompt_grid(models: list[tuple[str, Any, dict[str, Any]]], prompts: list[str], seed: int, path: Path,
                 title: str) -> None:
    """A grid with one row per prompt and, for each model, :data:`GRID_NOISE` columns, each column one noise draw
    shared by every model (the same noise and prompt: the models' images compare one to one)."""
    import torch

    from .eval.images import save_labelled_grid
    from .models.hf import generate_images

    repeated = [p for p in prompts for _ in range(GRID_NOISE)]
    blocks = [generate_images(model, repeated, seed=seed, **kw).reshape(len(prompts), GRID_NOISE,
                                                                        *model.sample_shape)
              for _, model, kw in models]
    labels = [f"{name}\nnoise {j + 1}" for name, _, _ in models for j in range(GRID_NOISE)]
    save_labelled_grid(torch.cat(blocks, dim=1), path, prompts, labels, title=title)


def run_text_demo(out: Path, n: int = TEXT_DEMO_N, seed: int = 0,
                  distill_iterations: int = TEXT_DEMO_ITERATIONS) -> Path:
    """``fewstep demo --text``: distill a one-step DMD2 student from the shipped shapes text-to-image teacher, measure
    both on the prompts of every composition, and write the report with prompt-labelled grids into ``out`` (which
    must not exist); return the report's path.

    ``out/dmd2`` is the DMD2 run with the report every run gets (``eval.json``, ``nfe_curve.json``,
    ``report.html``); ``out/metrics.json`` holds the demo's table: the teacher at falling step counts (CFG 1, the
    student's guidance), the teacher at CFG 3, and the student, on adherence (seen and held-out compositions), FID,
    precision and recall.

    Args:
        out: the demo's directory.
        n: samples per evaluation (prompts cycled: the 32 held-out compositions first, then the 96 seen).
        seed: sampling and training seed.
        distill_iterations: DMD2 iterations.
    """
    import json

    from .api import check_sample_count, evaluate, load_teacher
    from .data.shapes import evaluation_prompts, heldout_prompts, seen_prompts
    from .distillation import distill
    from .eval.report import write_report
    from .report import write_run_report

    out = Path(out)
    check_sample_count(n, (3, 16, 16))  # before anything is made
    if n < 10:
        raise UserError(f"--n {n} is too few samples for FID and adherence; pass --n 10 or more (default "
                        f"{TEXT_DEMO_N}: one per composition)")
    out.mkdir(parents=True)
    teacher = load_teacher("shapes")
    student = distill("shapes", "dmd2", steps=1, out=out / "dmd2", iterations=distill_iterations, evaluate_n=0,
                      seed=seed, **DMD2_SHAPES)
    guidance = student.info["meta"]["guidance_scale"]
    write_run_report(out / "dmd2", student, teacher, n=n, seed=seed, data="shapes", cfg_scale=guidance)
    curve = json.loads((out / "dmd2" / "nfe_curve.json").read_text())  # the teacher's rows, then the student's
    rows = [{**r, "model": "DMD2 student" if r["sampler"] == "student" else "teacher"} for r in curve]
    guided = evaluate(teacher, n=n, steps=8, sampler="heun", cfg_scale=TEXT_DEMO_CFG, seed=seed,
                      prompts=evaluation_prompts())
    rows.insert(len(rows) - 1, {**guided, "model": "teacher"})
    atomic_write_json(out / "metrics.json", rows)
    keys = ["model", "sampler", "steps", "cfg_scale", "nfe", "adherence", "adherence_seen", "adherence_heldout",
            "fid", "precision", "recall", "seconds_per_1000"]
    models = [("teacher\nHeun 8", teacher, {"steps": 8, "sampler": "heun", "cfg_scale": guidance}),
              ("DMD2\nstudent", student, {}),
              ("teacher\nDDIM 1", teacher, {"steps": 1, "sampler": "ddim", "cfg_scale": guidance})]
    grids = []
    for what, prompts in tqdm([("seen", _spread(seen_prompts())), ("held-out", _spread(heldout_prompts()))],
                              desc="sample grids", unit="grid"):
        rel = f"samples/{what.replace('-', '')}.png"
        _prompt_grid(models, prompts, seed, out / rel,
                     f"{what} compositions: each row one prompt, each column one noise draw")
        grids.append((f"{what} compositions ({len(prompts)} prompts): the teacher at 8 Heun steps, the one-step "
                      "student and the teacher's own one step, from the same noise column by column: "
                      + "; ".join(prompts), rel))
    sections = [
        {"heading": "The teacher at falling step counts, and a one-step DMD2 student",
         "text": f"{n} samples each, one prompt per composition cycled (the 32 compositions held out of the "
                 "teacher's training first, then the 96 seen). Adherence: the share of samples whose shape, colour, "
                 "position and size the shipped attribute classifier reads as the prompt names (adherence_seen / "
                 "adherence_heldout: on seen and held-out compositions). FID, precision and recall on that "
                 "classifier's features, against real drawings of the same prompts (at this sample count FID's "
                 "floor, real drawings against the reference, is well above zero). The teacher samples without "
                 f"guidance, as the student was distilled (CFG {guidance:g}), and once at CFG {TEXT_DEMO_CFG:g}. "
                 "The DMD2 run directory dmd2/ holds its own report.html and eval.json, its resolved config, "
                 "metrics.jsonl, checkpoints and sample grids over training.",
         "table": [{k: r.get(k) for k in keys} for r in rows],
         "images": [("FID against NFE: the teacher per sampler, the student a point", "dmd2/nfe_curve.png")]},
        {"heading": "Samples, labelled by their prompts", "images": grids},
        _dmd2_run_section(out),
    ]
    return write_report(out / "report.html", "fewstep demo --text: the shapes text-to-image teacher", sections)
