"""The page of ``fewstep bench``: one table, the quality-vs-NFE frontier, sample grids from the same noise and labels,
the convergence curves; PNGs beside it, embedded in ``report.html`` (:func:`fewstep.eval.report.write_report`)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .results import BENCH_HEADERS, compared_teacher_rows, fmt, headline_metric

#: seed of the sample grids' noise (the same for every model of a data set)
GRID_SEED = 0
GRID_IMAGES = 100  # 10 rows of the 10 classes
GRID_POINTS = 2000  # at most: the plan's evaluation samples when fewer
#: the metrics.jsonl key the convergence curves draw
CONVERGENCE_KEY = "generator/loss"

_TABLE_COLUMNS = ["data", "method", "steps", "nfe", "fid", "fid_heldout", "precision", "recall", "class_accuracy",
                  "sliced_w", "modes_covered", "seconds_per_1000", "wall_seconds", "peak_memory_gb",
                  "step_efficiency"]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The report's one table: per data set the teacher (DDIM at the students' NFE, and its best setting), then every
    student; cells ``mean ± std``, ``-`` where a metric does not apply or was not measured."""
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        students = [r for r in sub if r["method"] != "teacher"]
        teacher = compared_teacher_rows([r for r in sub if r["method"] == "teacher"], {r["nfe"] for r in students})
        for r in [{**t, "method": f"teacher ({t['variant']})"} for t in teacher] + students:
            out.append({BENCH_HEADERS.get(c, c): fmt(r.get(c), r.get(f"{c}_std")) for c in _TABLE_COLUMNS})
    return out


def frontier(rows: list[dict[str, Any]], path: Path, data: str) -> Path:
    """Quality against NFE on ``data``: the teacher's curve for each sampler, each student a point with its std."""
    from ..eval.images import plot_nfe_frontier

    metric = headline_metric(rows)
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] == "teacher" and r.get(metric) is not None:
            curves.setdefault(r["variant"], []).append((r["nfe"], r[metric]))
    students = [r for r in rows if r["method"] != "teacher" and r.get(metric) is not None]
    points = [(f"{r['method']} {r['steps']}-step", r["nfe"], r[metric], r.get(f"{metric}_std")) for r in students]
    name = "FID (train split)" if metric == "fid" else "sliced W"
    return plot_nfe_frontier(curves, points, path, metric=name, title=f"{data}: quality against NFE",
                             groups=[r["method"] for r in students])


def sample_grids(plan: Any, data: str, folder: Path) -> list[tuple[str, str]]:
    """The teacher at 1, 4 and 63 NFE and every student (of the first seed) from the same noise and labels:
    ``[(caption, path relative to the report)]``."""
    import torch

    from ..api import generate, load_teacher
    from ..data import load_data
    from ..eval.images import save_grid, save_points
    from .runs import GRID_TEACHER, load_run_student

    teacher = load_teacher(data)
    models = [(f"teacher {s} {k} steps", teacher, {"steps": k, "sampler": s}) for s, k in GRID_TEACHER]
    for run in (r for r in plan.runs if r.data == data and r.seed == plan.seeds[0]):
        for k in run.students:
            models.append((f"{run.method} {k}-step", load_run_student(run, k), {}))
    images = len(teacher.sample_shape) == 3
    reference = None if images else load_data(data, "test").x
    lim = None if images else 1.15 * float(torch.as_tensor(reference).abs().max())
    out = []
    for caption, model, kw in models:
        x, _, stats = generate(model, GRID_IMAGES if images else min(GRID_POINTS, plan.n), seed=GRID_SEED, **kw)
        caption = f"{caption} (NFE {stats['nfe']})"
        path = folder / f"{data}_{caption.split(' (')[0].replace(' ', '_')}.png"
        if images:
            save_grid(x, path, nrow=10)
        else:
            save_points(x, path, reference=reference, title=caption, lim=lim)
        out.append((caption, path))
    return [(c, p.relative_to(plan.out).as_posix()) for c, p in out]


def convergence(plan: Any, data: str, path: Path) -> Path | None:
    """``generator/loss`` over training from each run's ``metrics.jsonl``: one panel per method, one line per step
    count (the mean over seeds, a band of ± std); None when no run logged it."""
    from matplotlib.figure import Figure

    from ..eval.images import _save_figure
    from ..train.loop import read_metrics

    curves: dict[str, dict[int, dict[int, list[float]]]] = {}
    for run in (r for r in plan.runs if r.data == data):
        for row in read_metrics(run.run_dir / "metrics.jsonl"):
            v = row.get(CONVERGENCE_KEY)
            if isinstance(v, (int, float)) and math.isfinite(v):
                curves.setdefault(run.method, {}).setdefault(run.steps, {}).setdefault(int(row["it"]), []).append(v)
    if not curves:
        return None
    fig = Figure(figsize=(4 * len(curves), 3.4))
    for i, (method, by_steps) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), i + 1)
        for k, by_it in sorted(by_steps.items()):
            its = sorted(by_it)
            mean = [statistics.fmean(by_it[t]) for t in its]
            std = [statistics.stdev(by_it[t]) if len(by_it[t]) > 1 else 0.0 for t in its]
            label = f"ladder to {k} step(s)" if method == "lightning" else f"{k} step(s)"
            ax.plot(its, mean, marker="." if len(its) < 30 else None, label=label)
            ax.fill_between(its, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        if i == 0:
            ax.set_ylabel(CONVERGENCE_KEY)
    return _save_figure(fig, path)


def write_bench_report(plan: Any, result: dict[str, Any]) -> Path:
    """Write the PNGs and ``report.html`` of a bench ``result`` into ``plan.out``; returns the page's path."""
    from ..eval.report import write_report

    out = plan.out
    rows, m = result["rows"], result["meta"]
    fronts, grids, conv = [], [], []
    for data in plan.data:
        sub = [r for r in rows if r["data"] == data]
        fronts.append((f"{data}: {headline_metric(sub)} against NFE", frontier(sub, out / f"frontier_{data}.png",
                                                                                data).relative_to(out).as_posix()))
        grids.append({"heading": f"Samples: {data}", "images": sample_grids(plan, data, out / "samples"),
                      "text": f"Every model from the same noise (seed {GRID_SEED}) and the same labels (one class a "
                              "column); students of the first training seed."})
        path = convergence(plan, data, out / f"convergence_{data}.png")
        if path is not None:
            conv.append((f"{data}: {CONVERGENCE_KEY}", path.relative_to(out).as_posix()))
    budget = "" if m.get("iterations") is None else f" with {m['iterations']} iterations"
    text = (f"{m['command']} on {m['machine']} ({m['date']}, torch {m['torch']}): training seeds {m['seeds']}, "
            f"{m['n']} evaluation samples per model and seed (evaluation seed = training seed), each method's shipped "
            f"config{budget}. Cells are mean ± std over the seeds.\n\n" + "\n\n".join(m.get("notes", [])))
    runs = [{"run": label, "folder": f"runs/{key}"} for label, key in m.get("runs", {}).items()]
    costs = [{"data": r["data"], "method": r["method"], "steps": str(r["steps"]),
              "step efficiency": fmt(r["step_efficiency"]), "top non-network costs (ms per step)": r["top_non_network"]}
             for r in rows if r.get("top_non_network")]
    sections = [
        {"heading": "Results", "text": text, "table": table_rows(rows)},
        {"heading": "Quality against NFE", "images": fronts,
         "text": "The teacher's curve for each sampler (mean over the seeds), every student a point with ± std."},
        *grids,
        {"heading": "Convergence", "images": conv,
         "text": f"{CONVERGENCE_KEY} from each run's metrics.jsonl: the mean over seeds, a band of ± std."},
        *([{"heading": "Step efficiency", "table": costs,
            "text": "The share of a training step in the networks' forward and backward passes (PyTorch profiler, "
                    "fewstep.bench.profile) and the largest other costs."}] if costs else []),
        {"heading": "Runs", "table": runs},
    ]
    return write_report(out / "report.html", "fewstep bench", sections)
