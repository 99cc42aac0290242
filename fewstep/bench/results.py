"""The one benchmark result format (DESIGN.md): ``{"meta": ..., "rows": [...]}``, seed averaging, README tables.

Shared by ``fewstep bench`` and the scripts in ``benchmarks/`` (``benchmarks/common.py`` imports these). No torch at
import time, so that printing tables answers at once.
"""
from __future__ import annotations

import datetime as _dt
import os
import statistics
import sys
from typing import Any, Iterable

#: row keys that identify a row or count something and are never averaged
_NOT_AVERAGED = ("steps", "nfe", "iterations", "seeds")


def machine() -> str:
    """``"<cores> cores, <GPU name or 'no GPU'>"``."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {gpu}"


def meta(seeds: Iterable[int], command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` of a result: the command (default: this process's), UTC date, machine, torch, seeds, ``extra``."""
    import torch

    return {
        "command": command or "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__.split("+")[0],
        "seeds": list(seeds),
        **extra,
    }


def average(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the numeric metrics of per-seed rows; numbers that vary get a ``<name>_std`` beside them."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if key in _NOT_AVERAGED or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
    return out


def fmt(v: Any, std: Any = None) -> str:
    """A table cell: floats to 3 significant digits (``± std`` to 2 when given), None as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return f"{s} ± {std:.2g}" if std is not None else s
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], headers: dict[str, str] | None = None) -> str:
    """A markdown table of ``columns`` (headed by ``headers[c]`` where given), ``<c>_std`` shown as ``± std``."""
    names = [(headers or {}).get(c, c) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), r.get(f"{c}_std")) for c in columns) + " |")
    return "\n".join(lines)


def method_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The README columns of a method table: prompt adherence and FID for text-to-image rows (shapes), image metrics
    when the rows have an FID, 2-D ones otherwise."""
    if any(r.get("adherence") is not None for r in rows):
        return ["method", "variant", "steps", "nfe", "seeds", "adherence", "adherence_seen", "adherence_heldout",
                "fid", "precision", "recall", "seconds_per_1000", "wall_seconds"]
    if rows[0].get("fid") is not None:
        return ["method", "variant", "steps", "nfe", "fid", "fid_heldout", "precision", "recall", "class_accuracy",
                "wall_seconds"]
    return ["method", "variant", "steps", "nfe", "sliced_w", "modes_covered", "high_quality", "wall_seconds"]


def headline_metric(rows: list[dict[str, Any]]) -> str:
    """``fid`` for images (digits), ``sliced_w`` for points: the lower-is-better number a frontier plots."""
    return "fid" if any(r.get("fid") is not None for r in rows) else "sliced_w"


def teacher_pivot(rows: list[dict[str, Any]]) -> str:
    """One pivot per data set of teacher rows: sampler x NFE, the headline metric in each cell (Heun's 2n - 1
    evaluations sit under the budget 2n they fit, marked with their NFE)."""
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        metric = headline_metric(sub)
        budgets = sorted({r["nfe"] for r in sub if r["variant"] != "heun"})
        budgets += sorted({r["nfe"] + 1 for r in sub if r["variant"] == "heun" and r["nfe"] > max(budgets, default=0)})
        lines = [f"**{data}** ({'FID' if metric == 'fid' else 'sliced W'}; lower is better)", "",
                 "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for sampler in dict.fromkeys(r["variant"] for r in sub):
            cells = {}
            for r in (r for r in sub if r["variant"] == sampler):
                cell = fmt(r[metric], r.get(metric + "_std"))
                if sampler == "heun":
                    cells[min(b for b in budgets if b >= r["nfe"])] = f"{cell} ({r['nfe']})"
                else:
                    cells[r["nfe"]] = cell
            lines.append(f"| {sampler} | " + " | ".join(cells.get(n, "") for n in budgets) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


#: the columns of ``fewstep bench``'s method table: images, then points
BENCH_IMAGE_COLUMNS = ["method", "steps", "nfe", "fid", "fid_heldout", "precision", "recall", "class_accuracy",
                       "seconds_per_1000", "wall_seconds", "peak_memory_gb", "step_efficiency"]
BENCH_POINT_COLUMNS = ["method", "steps", "nfe", "sliced_w", "modes_covered", "high_quality", "seconds_per_1000",
                       "wall_seconds", "peak_memory_gb", "step_efficiency"]
BENCH_HEADERS = {"fid_heldout": "FID held-out", "fid": "FID", "class_accuracy": "class consistency",
                 "sliced_w": "sliced W", "modes_covered": "modes", "high_quality": "high quality",
                 "seconds_per_1000": "s / 1000 samples", "wall_seconds": "distillation s",
                 "peak_memory_gb": "peak memory GB", "step_efficiency": "step efficiency"}


def bench_tables(result: dict[str, Any]) -> str:
    """The README's benchmark tables from a ``fewstep bench`` result (``bench.json``): per data set, the teacher's
    sampler x NFE pivot, then every student (mean ± std over the seeds) with the teacher at the students' NFE and its
    best setting."""
    rows, m = result["rows"], result.get("meta", {})
    seeds = m.get("seeds") or []
    out = [f"From `{m.get('command', 'fewstep bench')}` ({m.get('date', '?')}, {m.get('machine', '?')}): mean ± std "
           f"over {len(seeds)} seed(s), {m.get('n', '?')} samples each."]
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        teacher = [r for r in sub if r["method"] == "teacher"]
        students = [r for r in sub if r["method"] != "teacher"]
        if teacher:
            out.append(teacher_pivot(teacher))
        shown = compared_teacher_rows(teacher, {r["nfe"] for r in students})
        table_rows = [{**r, "method": f"teacher ({r['variant']})"} for r in shown] + students
        if table_rows:
            columns = BENCH_IMAGE_COLUMNS if headline_metric(sub) == "fid" else BENCH_POINT_COLUMNS
            out.append(f"**{data}**: students\n\n" + markdown_table(table_rows, columns, BENCH_HEADERS))
    return "\n\n".join(out)


def compared_teacher_rows(teacher: list[dict[str, Any]], nfes: set[int]) -> list[dict[str, Any]]:
    """The teacher rows a student table shows: DDIM at the students' NFE, and the best row of all (lowest headline
    metric)."""
    if not teacher:
        return []
    metric = headline_metric(teacher)
    best = min((r for r in teacher if r.get(metric) is not None), key=lambda r: r[metric], default=None)
    rows = [r for r in teacher if r["variant"] == "ddim" and r["nfe"] in nfes]
    return rows + ([best] if best is not None and best not in rows else [])
