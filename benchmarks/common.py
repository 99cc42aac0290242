"""Shared pieces of the benchmark scripts: the one result format (DESIGN.md), seed averaging, tables."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable

# the result format's pieces live in the package (fewstep bench writes the same shape); re-exported for the scripts
from fewstep.bench.results import average, fmt, machine, markdown_table, meta, method_columns  # noqa: F401
from fewstep.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_main(main: Callable[[], Any]) -> None:
    """A script's entry point: bad input (fewstep's ``UserError``, e.g. an unknown ``--phase`` or a run directory
    that is not a student) is one line on stderr and exit status 2, as in ``fewstep``'s own CLI, not a traceback."""
    from fewstep.errors import UserError

    script = Path(sys.argv[0]).name
    try:
        status = main()
    except UserError as e:
        sys.stderr.write(f"{script}: error: {e}\n")
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


def finished_run(out: Path, name: str, key: Any) -> Any | None:
    """What a finished run left in ``out/<name>`` (:func:`keep_run`) when it was made for ``key``; otherwise None, and
    ``out`` is removed, so that an unfinished run (or one made for another key) is trained afresh."""
    import json
    import shutil

    path = out / name
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    if out.exists():
        shutil.rmtree(out)
    return None


def keep_run(out: Path, name: str, key: Any, value: Any) -> None:
    """Record a finished run's ``value`` in ``out/<name>`` for ``key`` (atomically: a killed run leaves none)."""
    atomic_write_json(out / name, {"key": key, "value": value})


def write_results(name: str, meta_: dict[str, Any], rows: list[dict[str, Any]], by_data: bool = False) -> Path:
    """Write ``results/<name>.json``, keeping what this run did not measure from the earlier file (its command is
    recorded under ``meta.earlier``), so runs per data set or per variant add up to one result.

    A row is identified by its data, method, variant and steps; a re-measured row takes the old one's place. With
    ``by_data`` (curves: many rows per variant) every old row of a data set this run measured is dropped. Runs in
    parallel (one variant each) take turns through a lock file, so none loses another's rows."""
    import fcntl

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_results(RESULTS / f"{name}.json", meta_, rows, by_data)


def _merge_results(path: Path, meta_: dict[str, Any], rows: list[dict[str, Any]], by_data: bool) -> Path:
    import json

    def key(r: dict[str, Any]) -> tuple:
        return (r.get("data"),) if by_data else (r.get("data"), r.get("method"), r.get("variant"), r.get("steps"))

    if path.is_file():
        old = json.loads(path.read_text())
        new = {key(r): r for r in rows}
        kept = [r for r in old.get("rows", []) if key(r) not in new]
        if kept:
            earlier = {k: v for k, v in old.get("meta", {}).items() if k != "earlier"}
            earlier["data"] = sorted({r["data"] for r in kept})
            meta_ = {**meta_, "earlier": [earlier, *old.get("meta", {}).get("earlier", [])]}
            if by_data:
                rows = kept + rows
            else:  # old order, re-measured rows in their old place, new ones after their data set's
                merged = [new.pop(key(r), r) for r in old.get("rows", []) if key(r) in new or r in kept]
                for r in new.values():
                    last = max((i for i, m in enumerate(merged) if m["data"] == r["data"]), default=len(merged) - 1)
                    merged.insert(last + 1, r)
                rows = merged
    datas = list(dict.fromkeys(r["data"] for r in rows))  # per data set: the teacher's rows first, order kept
    rows = sorted(rows, key=lambda r: (datas.index(r["data"]), r.get("method") != "teacher"))
    return atomic_write_json(path, {"meta": meta_, "rows": rows})


TEACHER_SETTINGS = [("ddim", 1), ("ddim", 2), ("ddim", 4), ("heun", 32)]


def row_line(r: dict[str, Any]) -> str:
    key = "fid" if r.get("fid") is not None else "sliced_w"
    return (f"{r['data']:>8} {r['method']:>9} {r['variant']:>12} steps {r['steps']:>2} nfe {r['nfe']:>3}  "
            f"{key} {r[key]:.4g}")


def print_tables(rows: list[dict[str, Any]], datas: Iterable[str]) -> None:
    for data in datas:
        sub = [r for r in rows if r["data"] == data]
        print(f"\n### {data}\n" + markdown_table(sub, method_columns(sub)))


def teacher_rows(data: str, seeds: Iterable[int], n: int, line: Any = None) -> list[dict[str, Any]]:
    """The embedded teacher of ``data`` at ``TEACHER_SETTINGS`` (sampler, steps), averaged over ``seeds``; each row
    printed as it is measured (with ``line``, default :func:`row_line`)."""
    from fewstep.api import evaluate, load_teacher

    teacher, rows = load_teacher(data), []
    for sampler, steps in TEACHER_SETTINGS:
        rows.append(average([{"data": data, "method": "teacher", "variant": sampler, "steps": steps,
                              **evaluate(teacher, n=n, steps=steps, sampler=sampler, seed=s),
                              "iterations": None, "wall_seconds": None} for s in seeds]))
        print((line or row_line)(rows[-1]), flush=True)
    return rows


def benchmark_parser(doc: str, variants: Iterable[str]) -> Any:
    """The options every method benchmark takes: data sets, seeds, variants, evaluation samples, iterations."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--iterations", type=int, default=None, help="override the configs' iterations (quick runs)")
    return p


def method_benchmark(method: str, variants: dict[str, tuple[int, dict[str, Any]]], doc: str,
                     extra_rows: Any = None) -> None:
    """The command line of a method's benchmark: the teacher at ``TEACHER_SETTINGS``, then every variant
    (``name: (steps, config overrides)``; a name ending in ``-<k>step`` is reported as the variant before it)
    distilled with the shipped config ``configs/<method>_<data>.yaml`` and evaluated; writes
    ``results/<method>.json`` and prints the README tables. ``extra_rows(student, row, data, n, seed)`` (optional)
    returns more rows of one seed's run (e.g. one per step of a k-step student); each position is averaged over the
    seeds like the variant's own row and listed after it."""
    import shutil
    import tempfile
    import time

    from fewstep.api import evaluate
    from fewstep.distillation import distill

    a = benchmark_parser(doc, variants).parse_args()

    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    try:
        for data in a.data:
            rows.extend(teacher_rows(data, a.seeds, a.n))
            config = ROOT / "configs" / f"{method}_{data}.yaml"
            for variant in a.variants:
                steps, overrides = variants[variant]
                per_seed, extra = [], []
                for seed in a.seeds:
                    start = time.perf_counter()
                    student = distill(data, method, steps=steps, out=work / f"{data}-{variant}-{seed}",
                                      config=config if config.exists() else None, seed=seed,
                                      iterations=a.iterations, progress=False, evaluate_n=0, **overrides)
                    wall = time.perf_counter() - start
                    per_seed.append({"data": data, "method": method, "variant": variant.rsplit("-", 1)[0]
                                     if variant.endswith("step") else variant, "steps": steps,
                                     **evaluate(student, n=a.n, seed=seed),
                                     "iterations": student.info["meta"]["iterations"], "wall_seconds": wall})
                    if extra_rows is not None:
                        extra.append(extra_rows(student, per_seed[-1], data, a.n, seed))
                rows.append(average(per_seed))
                print(row_line(rows[-1]), flush=True)
                for i in range(len(extra[0]) if extra else 0):
                    rows.append(average([seed_rows[i] for seed_rows in extra]))
                    print(row_line({**rows[-1], "nfe": rows[-1]["nfe"] or "-"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results(method, meta(a.seeds, n=a.n), rows)
    print_tables(rows, a.data)
    print(f"\nwrote {path}")
