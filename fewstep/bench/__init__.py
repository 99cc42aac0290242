"""``fewstep bench``: every method distilled from the same embedded teacher with its shipped config
(``configs/<method>_<data>.yaml``), over training seeds and student step counts, measured with
:func:`fewstep.api.evaluate`, in one ``bench.json`` (DESIGN.md's result format), one ``report.html`` and its PNGs.

    fewstep bench --data digits,grid25 --methods dmd2,add,lightning,disback --steps 1,2,4 --seeds 3 --out DIR

The output folder is also the cache: ``DIR/runs/<key>/`` holds one training run, ``run/`` (a ``fewstep distill`` run
directory) and ``record.json`` (its wall time, peak memory and evaluations). The key hashes the resolved config
(without the fields that only decide logging and checkpointing, :data:`fewstep.train.loop.SAFE_TO_CHANGE_ON_RESUME`),
the teacher's and the digits classifier's weights and the code's version (fewstep's and :data:`CACHE_VERSION`). A
finished run is reused; a half-finished one (an interrupted plan) resumes from its newest checkpoint through the
loop's resume; one without a checkpoint starts over. Evaluations are cached in the record by sample count and seed,
the teacher's in ``DIR/teacher/<data>.json``, the step efficiency's (a profiled window of ``--profile-steps``
iterations of each method and steps, :mod:`fewstep.bench.profile`) in ``DIR/profile/<data>.json``: a second
invocation trains and measures nothing again.

Each record also keeps a hash of the source of the training code and of the evaluation code it ran with. Runs and
measurements made by other code are still reused (a shared work tree changes all day, and a plan takes hours), with
one warning that counts them and says how to refresh them: ``--remeasure`` measures again, deleting ``DIR/runs``
retrains.

Lightning walks its ladder in one run (8 -> 4 -> 2 -> 1 steps): the bench trains it once per seed down to the fewest
steps asked for, and its other rows are the ladder's rungs (their wall time is the whole ladder's). ADD's training
does not depend on the steps (it trains at its ``student_times`` whatever they are): one run per seed at the most
steps asked, sampled at each step count (:data:`fewstep.bench.runs.SAMPLER_ONLY_STEPS`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic_write_json
from .results import average, bench_tables, meta
from .runs import (CACHE_VERSION, EVALUATION_CODE, PROFILE_CODE, TRAINING_CODE, Plan, Run, _Measures, _read_json,
                   _teacher_cached, code_hash, evaluate_run, make_plan, profile_rows, teacher_rows, train_run)

__all__ = ["CACHE_VERSION", "Plan", "Run", "make_plan", "print_tables", "run_bench"]


def run_bench(plan: Plan, progress: bool = True, command: str | None = None, remeasure: bool = False) -> dict[str, Any]:
    """Train (or reuse) every run of ``plan``, measure the teachers and the students, write ``bench.json``,
    ``report.html`` and the PNGs into ``plan.out``; returns the result (``{"meta", "rows"}``).

    Args:
        plan: from :func:`make_plan`.
        progress: a bar over the whole plan (runs done / total, the current run, ETA), each run's own bar below it.
        command: the command line recorded in ``meta`` (default: this process's).
        remeasure: measure every teacher setting and student again, not from the cache.
    """
    from tqdm.auto import tqdm

    from .report import write_bench_report

    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.out / "plan.json", {
        "data": plan.data, "methods": plan.methods, "steps": plan.steps, "seeds": plan.seeds, "n": plan.n,
        "iterations": plan.iterations, "runs": [{"label": r.label, "key": r.key} for r in plan.runs]})
    measures = _Measures(code_hash(EVALUATION_CODE), remeasure)
    profiles = _Measures(code_hash(PROFILE_CODE), remeasure)
    training_code = code_hash(TRAINING_CODE)
    started = time.perf_counter()
    done = sum(_teacher_cached(plan, d) for d in plan.data) + sum(r.finished() for r in plan.runs)
    rows: list[dict[str, Any]] = []
    records: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(plan.data) + len(plan.runs), initial=done, disable=not progress, desc="bench", unit="run",
              dynamic_ncols=True, position=0) as bar:
        for data in plan.data:
            per_seed: dict[tuple[str, int], list[dict[str, Any]]] = {}
            cached = _teacher_cached(plan, data)
            bar.set_description(f"bench: teacher {data}")
            rows.extend(teacher_rows(plan, data, measures))
            if not cached:
                bar.update(1)
            for run in (r for r in plan.runs if r.data == data):
                cached = run.finished()
                bar.set_description(f"bench: {run.label}")
                record = records[run.key] = train_run(run, training_code, progress=progress)
                for row in evaluate_run(run, record, plan.n, measures):
                    per_seed.setdefault((run.method, row["steps"]), []).append(row)
                if not cached:
                    bar.update(1)
            bar.set_description(f"bench: profiling {data}")
            shares = profile_rows(plan, data, profiles)
            for (method, k), seed_rows in per_seed.items():
                row = {key: v for key, v in average(seed_rows).items() if key not in ("seed", "seed_std")}
                share = shares.get((method, k), {})
                row["step_efficiency"] = share.get("network_share")
                row["top_non_network"] = share.get("top_non_network")
                rows.append(row)
    stale_runs = sum(r.get("training_code") != training_code for r in records.values())
    stale = measures.stale + profiles.stale
    if stale_runs or stale:
        warnings.warn(f"{plan.out}: {stale_runs} cached run(s) were trained and {stale} cached "
                      "measurement(s) made by other code than this; pass --remeasure to measure again, or delete "
                      f"{plan.out / 'runs'} to train again", stacklevel=2)
    memory_kind = next((r.get("peak_memory_kind") for r in records.values() if r.get("peak_memory_kind")), None)
    result = {"meta": meta(plan.seeds, command=command, n=plan.n, iterations=plan.iterations, data=plan.data,
                           methods=plan.methods, steps=plan.steps, wall_seconds=time.perf_counter() - started,
                           peak_memory=memory_kind, stale_runs=stale_runs,
                           stale_measurements=stale,
                           profile={"warmup": plan.profile_warmup, "steps": plan.profile_steps},
                           runs={r.label: r.key for r in plan.runs}, notes=_notes(plan)),
              "rows": rows}
    atomic_write_json(plan.out / "bench.json", result)
    write_bench_report(plan, result)
    return result


def _notes(plan: Plan) -> list[str]:
    notes = ["digits: FID, precision and recall against the train split, fid_heldout against the test split; points "
             "against the test split (fewstep.api.evaluate)",
             "wall_seconds: the distillation's wall time (set-up and training; a resumed run adds the time its "
             "checkpoint had recorded); peak_memory_gb: on a GPU the peak allocated CUDA memory of the run, else the "
             "process's peak resident memory up to the run's end (ru_maxrss: it includes what the process held "
             "before, the earlier runs' peaks too, so on CPU it compares runs only roughly)",
             "step_efficiency: the share of a training step in the networks' forward and backward passes, measured "
             f"with the PyTorch profiler over {plan.profile_steps} iterations (after {plan.profile_warmup}) of the "
             "first seed's config (fewstep.bench.profile; lightning: in the last phase of each rung's stage); "
             "top_non_network: the five largest other costs, milliseconds per step"
             if plan.profile_steps else "step_efficiency: not measured (--profile-steps 0)"]
    if "lightning" in plan.methods and len(plan.steps) > 1:
        notes.append(f"lightning: one run per seed walks the ladder to {min(plan.steps)} step(s); its rows of more "
                     "steps are the ladder's rungs and carry the whole run's wall time and memory")
    return notes


def print_tables(path: str | Path) -> str:
    """The README's markdown tables from a ``bench.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "bench.json"
    result = _read_json(path, None)
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise UserError(f"{path} is not a fewstep bench result (bench.json with meta and rows); give the bench.json "
                        "that `fewstep bench --out DIR` wrote")
    return bench_tables(result)
