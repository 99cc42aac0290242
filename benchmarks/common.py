"""Shared pieces of the benchmark scripts: the one result format (DESIGN.md), seed averaging, tables."""
from __future__ import annotations

import datetime as _dt
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from fewstep.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores, {gpu}"


def meta(seeds: Iterable[int], **extra: Any) -> dict[str, Any]:
    return {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
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
        if key in ("steps", "nfe", "iterations") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
    return out


def write_results(name: str, meta_: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write ``results/<name>.json``. Rows of data sets this run did not measure are kept from the earlier file
    (with the earlier run's command recorded under ``meta.earlier``), so per-data runs add up to one result."""
    import json

    path = RESULTS / f"{name}.json"
    ran = {r["data"] for r in rows}
    if path.is_file():
        old = json.loads(path.read_text())
        kept = [r for r in old.get("rows", []) if r.get("data") not in ran]
        if kept:
            earlier = {k: v for k, v in old.get("meta", {}).items() if k != "earlier"}
            earlier["data"] = sorted({r["data"] for r in kept})
            meta_ = {**meta_, "earlier": [earlier, *old.get("meta", {}).get("earlier", [])]}
            rows = kept + rows
    return atomic_write_json(path, {"meta": meta_, "rows": rows})


def fmt(v: Any, std: Any = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return f"{s} ± {std:.2g}" if std is not None else s
    return str(v)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), r.get(f"{c}_std")) for c in columns) + " |")
    return "\n".join(lines)
