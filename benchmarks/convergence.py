"""Convergence: DMD2 against DisBack + DMD2, quality every K iterations, same teacher, seeds and budget.

    python benchmarks/convergence.py                          # digits and grid25, seed 0, the configs' budgets
    python benchmarks/convergence.py --data grid25 --seeds 0 1 2 --every 100
    python benchmarks/convergence.py --data grid25 --seeds 0 1 2 --regime long --start teacher student
    python benchmarks/convergence.py --data grid25 --iterations 600 --every 100 --n 1000   # a quick look

Both methods run the same DMD2 (configs/dmd2_<data>.yaml; DisBack's ``dmd2:`` section is replaced by it, so only the
DisBack options of configs/disback_<data>.yaml differ) from the same teacher, seeds and total budget. The budget is
counted in iterations and **includes DisBack's degradation recording**: DisBack distils for ``budget - N *
record_every`` iterations after recording for ``N * record_every`` (its path is recorded afresh for every run, with
``record_seed`` = the run's seed). Every ``--every`` iterations the generator as it is at that point is sampled and
measured with ``fewstep.api.evaluate`` (FID on digits, sliced Wasserstein distance on grid25; lower is better), through
the training loop's ``sample_fn`` hook. A curve is rows with increasing ``iterations`` (DESIGN.md's result format);
rows are means over ``--seeds`` with ``<metric>_std`` beside them.

Regimes (``--regime``): ``configs`` runs the shipped DisBack options; ``long`` is sized by shares of the budget (the
issue-17 regime: default budget 10,000 iterations): the recording takes ``--record-share`` of it (10%) in
``--record-checkpoints`` checkpoints, and the path (all targets but the teacher) ``--path-share`` of the
distillation's generator updates (30%), so each node gets a real share of generator updates (``switch_unit:
generator_updates``). ``--head-along-path`` runs DisBack with ``head_along_path`` (DMD2's GAN head recorded with the
path and restored at each switch); ``--disback-option KEY=VALUE`` sets any other DisBack option (e.g. ``record_lr``).

Starts (``--start``): ``teacher`` (the paper's: both generators start from the teacher) and ``student`` (the reference
code's SDXL setting: DisBack as a stage on top of a trained DMD2 generator). For ``student`` the DMD2 run lasts
``--student-iterations`` (K) longer; its generator at iteration K is the student DisBack starts from
(``init_generator``), and DMD2's own curve from K on is the baseline, both counted from K. (The teacher-start DMD2
curve is the first ``budget`` iterations of that same run: DMD2's training does not depend on the total length.)

The target (the DisBack paper's claim at our scale), per data set and start: Q = DMD2's final quality, the mean of its
curve's last 3 points (one evaluation is noisy once a curve has flattened), per seed (the reported Q is their mean).
Each run's iterations to *first* reach its seed's Q (DisBack's including its recording) are measured per seed; the
target is met when DisBack's mean is at most 60% of DMD2's (every seed reaching Q) and DisBack's final quality is no
worse than DMD2's. The same first-reach iterations are given for levels above Q (``--levels``, multiples of Q) for
the whole curve. ``meta.target`` holds them.

Writes benchmarks/results/convergence.json and benchmarks/results/convergence.png (``--name`` other files).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from common import RESULTS, average, finished_run, keep_run, markdown_table, meta, write_results, run_main  # noqa: E402

from fewstep.api import evaluate, load_teacher  # noqa: E402
from fewstep.config import DMD2Config, validate_config  # noqa: E402
from fewstep.data import load_data  # noqa: E402
from fewstep.methods.disback import SHARED_FIELDS, DisBackConfig, DisBackMethod  # noqa: E402
from fewstep.methods.dmd2 import DMD2Method  # noqa: E402
from fewstep.student import Student  # noqa: E402
from fewstep.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRIC = {"digits": "fid", "grid25": "sliced_w"}  # the quality each curve tracks (lower is better)
TARGET_FRACTION = 0.6
LAST = 3  # "final quality": the mean of a curve's last 3 points
LONG_BUDGET = 10_000


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def long_regime(budget: int, ttur: int, checkpoints: int, record_share: float, path_share: float) -> dict[str, Any]:
    """DisBack options sized by shares of the budget: the recording ``record_share`` of it, the path's targets
    (every stage but the last, the teacher) ``path_share`` of the distillation's generator updates."""
    record_every = max(1, int(record_share * budget) // checkpoints)
    distill = budget - checkpoints * record_every
    generator_updates = math.ceil(distill / ttur)
    stages_before_teacher = max(1, checkpoints - 1)
    return {"record_checkpoints": checkpoints, "record_every": record_every, "switch_unit": "generator_updates",
            "switch_every": max(1, int(path_share * generator_updates) // stages_before_teacher),
            "switch_threshold": None}


def configs(data: str, budget: int | None, seed: int, every: int, work: Path, extra: int = 0,
            disback_options: dict[str, Any] | None = None, init_generator: str | None = None,
            tag: str = "teacher") -> tuple[DMD2Config, DisBackConfig]:
    """The two runs' configs: DMD2 from configs/dmd2_<data>.yaml (``budget + extra`` iterations), DisBack from
    configs/disback_<data>.yaml (with ``disback_options`` over it) with the same DMD2 section, loop and budget (the
    recording's iterations taken out of its distillation)."""
    dmd2_data = _yaml(ROOT / "configs" / f"dmd2_{data}.yaml")
    dmd2_data.setdefault("teacher", data)
    dmd2 = validate_config(DMD2Config, dmd2_data, f"dmd2_{data}.yaml")
    budget = budget or dmd2.loop.iterations
    loop = dmd2.loop.model_copy(update={"iterations": budget, "seed": seed, "sample_every": every,
                                        "checkpoint_every": budget, "keep_checkpoints": 1, "progress": False})
    dmd2 = dmd2.model_copy(update={"loop": loop.model_copy(update={"iterations": budget + extra,
                                                                    "checkpoint_every": budget + extra})})

    db_data = _yaml(ROOT / "configs" / f"disback_{data}.yaml")
    db_data.setdefault("teacher", data)
    db_data["dmd2"] = {k: v for k, v in dmd2.model_dump(mode="json").items() if k not in SHARED_FIELDS}
    for key in ("teacher", "data", "steps"):
        db_data[key] = getattr(dmd2, key)
    db_data.update(disback_options or {})
    db_data["base"] = "dmd2"
    db_data["record_seed"] = seed
    db_data["init_generator"] = init_generator
    db_data["path_dir"] = str(work / f"paths-{data}-{tag}-{seed}")
    db = validate_config(DisBackConfig, db_data, f"disback_{data}.yaml")
    recording = db.recording_iterations()
    if recording >= budget:
        raise SystemExit(f"{data}: the recording's {recording} iterations leave nothing of the {budget}-iteration budget")
    db = db.model_copy(update={"loop": loop.model_copy(update={"iterations": budget - recording})})
    return dmd2, DisBackConfig.model_validate(db.model_dump(mode="json"))


def run_curve(method_name: str, teacher: Any, cfg: Any, dataset: Any, data: str, n: int, out: Path,
              offset: int = 0, save_at: int | None = None, save_to: Path | None = None) -> list[dict[str, Any]]:
    """Train one run, evaluating the generator every ``cfg.loop.sample_every`` iterations (and before the first);
    ``save_at``: also write the generator's network weights at that iteration to ``save_to`` (a student to start
    from).

    A finished curve is kept as ``out/curve.json`` (with ``--keep``, the folder survives), and a run whose curve (and
    student, with ``save_at``) is there is not trained again: an interrupted benchmark goes on from its last finished
    run."""
    key = cfg.model_dump(mode="json")
    if save_to is not None and not save_to.is_file():  # its student is missing: the run is trained again
        shutil.rmtree(out, ignore_errors=True)
    cached = finished_run(out, "curve.json", key)
    if cached is not None:
        print(f"  {data:>7} {method_name:>8} reusing the finished curve in {out / 'curve.json'}", flush=True)
        return cached
    torch.manual_seed(cfg.loop.seed)
    method = (DMD2Method if method_name == "dmd2" else DisBackMethod)(teacher, cfg)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    timing = {"eval": 0.0}

    def measure(iterations: int) -> None:
        t0 = time.perf_counter()
        student = Student(method.inference_model(), method.timesteps)
        if save_at is not None and iterations == save_at:
            from safetensors.torch import save_file

            assert save_to is not None
            save_file({k: v.detach().cpu().contiguous() for k, v in student.generator.net.state_dict().items()},
                      str(save_to))
        metrics = evaluate(student, data=data, n=n, seed=1234)
        timing["eval"] += time.perf_counter() - t0
        rows.append({"data": data, "method": method_name, "steps": student.steps,
                     **{k: metrics.get(k) for k in ("nfe", "fid", "precision", "recall", "class_accuracy",
                                                    "sliced_w", "modes_covered", "high_quality")},
                     "iterations": iterations,
                     "wall_seconds": round(time.perf_counter() - start - timing["eval"], 2)})
        key = METRIC[data]
        print(f"  {data:>7} {method_name:>8} it {iterations:>5}  {key} {rows[-1][key]:.4g}", flush=True)

    measure(offset)
    if method_name == "disback":
        method.dataset = dataset  # as the loop does: real data for a recording of the GAN head (head_along_path)
        method.to(torch.device("cpu"))  # the recording happens here (the loop would do it on its device)
        rec = cfg.recording_iterations()
        rows.append({**rows[-1], "iterations": offset + rec,
                     "wall_seconds": round(time.perf_counter() - start - timing["eval"], 2)})
        offset += rec
    train(method, dataset, cfg.loop, out, sample_fn=lambda step, _path: measure(offset + step), config=cfg)
    keep_run(out, "curve.json", key, rows)
    return rows


def first_reach(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first iteration of ``curve`` whose value is at most ``level`` (None: never)."""
    return next((it for it, v in curve if v <= level), None)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def target_summary(curves: dict[str, list[list[tuple[int, float]]]], key: str, budget: int,
                   levels: list[float]) -> dict[str, Any]:
    """The target of one data set and start from per-seed curves ``{method: [[(iterations, value), ...], ...]}``
    (iterations counted from the start, DisBack's recording included; see the module docstring)."""
    finals = {m: [statistics.fmean(v for _, v in c[-LAST:]) for c in cs] for m, cs in curves.items()}
    qs = finals["dmd2"]  # per seed: that seed's DMD2 final (it reaches its own, within its last points)
    q = statistics.fmean(qs)
    out: dict[str, Any] = {"metric": key, "budget": budget, "final_is_mean_of_last": LAST, "Q": q, "Q_per_seed": qs,
                           "levels": []}
    for m in curves:
        out[f"{m}_final"], out[f"{m}_final_std"] = _mean_std(finals[m])
    for factor in levels:
        level: dict[str, Any] = {"factor": factor, "value": q * factor}
        for m, cs in curves.items():
            its = [first_reach(c, qs[i] * factor) for i, c in enumerate(cs)]
            reached = [i for i in its if i is not None]
            level[f"{m}_iterations"] = its
            level[f"{m}_mean"], level[f"{m}_std"] = _mean_std([float(i) for i in reached])
            level[f"{m}_reached"] = f"{len(reached)}/{len(its)}"
        both = [(d, b) for d, b in zip(level["dmd2_iterations"], level["disback_iterations"])
                if d is not None and b is not None and d > 0]
        level["fraction_per_seed"] = [b / d for d, b in both]
        level["fraction"] = (None if level["disback_mean"] is None or not level["dmd2_mean"]
                             or level["disback_reached"] != f"{len(curves['disback'])}/{len(curves['disback'])}"
                             else level["disback_mean"] / level["dmd2_mean"])
        out["levels"].append(level)
    at_q = next(lv for lv in out["levels"] if lv["factor"] == 1.0)
    out["fraction_of_dmd2_iterations"] = at_q["fraction"]
    out["reached_within_60pct"] = at_q["fraction"] is not None and at_q["fraction"] <= TARGET_FRACTION
    out["ends_no_worse"] = out["disback_final"] <= out["dmd2_final"]
    out["met"] = out["reached_within_60pct"] and out["ends_no_worse"]
    return out


def diagnose(work: Path) -> list[dict[str, Any]]:
    """What the generator is pulled by, per DisBack stage, from the kept runs' ``metrics.jsonl`` (``--diagnose DIR``):
    the mean ``generator/score_mismatch`` ``E ||D_target - D_fake||^2`` (DisBack: against the stage's target; DMD2:
    against the teacher, over the same iterations of its own distillation, i.e. DMD2's first ones for DisBack's
    first stage) and the mean DM loss (DMD2's normalised loss, not a gradient size). A target fitted to the
    generator leaves it a small mismatch, so a small distribution-matching gradient."""
    from fewstep.train import read_metrics

    out = []
    for db in sorted(work.glob("*-disback-*-*")):
        data, _, start, seed = db.name.split("-")
        dmd2 = work / f"{data}-dmd2-{seed}" / "metrics.jsonl"
        cached = db / "curve.json"
        if not (db / "metrics.jsonl").is_file() or not dmd2.is_file() or not cached.is_file():
            continue
        # the student start's curve begins at the student's DMD2 iteration
        origin = json.loads(cached.read_text())["value"][0]["iterations"] if start == "student" else 0
        rows, base = read_metrics(db / "metrics.jsonl"), read_metrics(dmd2)
        for stage in sorted({r["generator/stage"] for r in rows if "generator/stage" in r}):
            rs = [r for r in rows if r.get("generator/stage") == stage and "generator/score_mismatch" in r]
            lo, hi = origin + rs[0]["it"], origin + rs[-1]["it"]
            bs = [r for r in base if lo <= r["it"] <= hi and "generator/score_mismatch" in r]
            mean = lambda xs, k: statistics.fmean(x[k] for x in xs) if xs else None  # noqa: E731
            out.append({"data": data, "start": start, "seed": int(seed), "stage": int(stage),
                        "iterations": f"{lo}-{hi}", "disback_mismatch": mean(rs, "generator/score_mismatch"),
                        "dmd2_mismatch": mean(bs, "generator/score_mismatch"), "disback_dm": mean(rs, "generator/dm"),
                        "dmd2_dm": mean(bs, "generator/dm")})
    return out


def _start_of(row: dict[str, Any]) -> str:
    return "teacher" if row.get("variant") in (None, "full") else row["variant"]  # older files: "full"


def plot(rows: list[dict[str, Any]], targets: dict[str, Any], recording: dict[str, int], path: Path) -> None:
    """One panel per (data set, start): each method's mean curve with a band of ± one std over seeds, Q and each
    method's mean iterations to first reach it."""
    import io

    from matplotlib.figure import Figure

    from fewstep.io import atomic_write_bytes

    panels = list(dict.fromkeys((r["data"], _start_of(r)) for r in rows))
    fig = Figure(figsize=(5.5 * len(panels), 3.8))
    for i, (data, start) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        key = METRIC[data]
        name = f"{data}/{start}"
        target = targets.get(name, {})
        for method, style, color in (("dmd2", "-o", "tab:blue"), ("disback", "-s", "tab:orange")):
            pts = [r for r in rows if r["data"] == data and _start_of(r) == start and r["method"] == method
                   and r.get(key) is not None]
            if not pts:
                continue
            xs = [r["iterations"] for r in pts]
            ys = [r[key] for r in pts]
            ax.plot(xs, ys, style, color=color, markersize=3, label="DMD2" if method == "dmd2" else "DisBack + DMD2")
            if any(r.get(f"{key}_std") is not None for r in pts):
                sd = [r.get(f"{key}_std") or 0.0 for r in pts]
                ax.fill_between(xs, [max(y - s, 1e-12) for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=color, alpha=0.2, lw=0)
            at_q = next((lv for lv in target.get("levels", []) if lv["factor"] == 1.0), None)
            if at_q and at_q.get(f"{method}_mean") is not None:
                ax.axvline(at_q[f"{method}_mean"], color=color, ls=":", lw=0.9)
        if "Q" in target:
            ax.axhline(target["Q"], color="grey", ls="--", lw=0.8, label=f"Q: DMD2 final (mean of last {LAST})")
        if recording.get(name):
            x0 = min(r["iterations"] for r in rows if r["data"] == data and _start_of(r) == start)
            ax.axvspan(x0, x0 + recording[name], color="tab:orange", alpha=0.12, label="DisBack recording")
        ax.set_yscale("log")
        ax.set_xlabel("iterations (recording included)")
        ax.set_ylabel(key)
        met = target.get("met")
        ax.set_title(f"{data}, from the {start}: target {'met' if met else 'not met' if met is not None else '?'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iterations", type=int, default=None,
                   help="total budget of each method (default: the DMD2 config's loop.iterations; --regime long: "
                        f"{LONG_BUDGET})")
    p.add_argument("--every", type=int, default=100, help="measure quality every this many iterations (K)")
    p.add_argument("--n", type=int, default=2000, help="evaluation samples per point")
    p.add_argument("--regime", choices=["configs", "long"], default="configs",
                   help="DisBack's options: the shipped config's, or sized by shares of the budget")
    p.add_argument("--record-share", type=float, default=0.1, help="long: the recording's share of the budget")
    p.add_argument("--path-share", type=float, default=0.3,
                   help="long: the path's targets' share of the distillation's generator updates")
    p.add_argument("--record-checkpoints", type=int, default=4, help="long: checkpoints along the path")
    p.add_argument("--start", nargs="+", choices=["teacher", "student"], default=["teacher"],
                   help="teacher-initialised generators, and/or DisBack on top of a DMD2 student")
    p.add_argument("--student-iterations", type=int, default=None,
                   help="student start: DMD2 iterations of the student (default: the budget; a multiple of --every)")
    p.add_argument("--head-along-path", action="store_true",
                   help="DisBack records DMD2's GAN head with the path and restores head^(k) at each switch")
    p.add_argument("--disback-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a DisBack option over the regime's (repeatable; VALUE read as YAML), e.g. record_lr=1e-5")
    p.add_argument("--levels", nargs="+", type=float, default=[1.0, 1.25, 1.5, 2.0, 4.0],
                   help="quality levels as multiples of Q (1 = Q itself, always included)")
    p.add_argument("--name", default="convergence", help="results files benchmarks/results/<name>.json/.png")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: a temp folder)")
    p.add_argument("--diagnose", type=Path, default=None, metavar="DIR",
                   help="print, from a --keep folder's runs, each DisBack stage's score mismatch and DM loss beside "
                        "DMD2's over the same iterations, and exit")
    a = p.parse_args()
    if a.diagnose is not None:
        print(markdown_table(diagnose(a.diagnose), ["data", "start", "seed", "stage", "iterations",
                                                    "disback_mismatch", "dmd2_mismatch", "disback_dm", "dmd2_dm"]))
        return
    levels = sorted({1.0, *a.levels})

    work = a.keep or Path(tempfile.mkdtemp(prefix="fewstep-convergence-"))
    work.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    recording: dict[str, int] = {}
    options: dict[str, Any] = {}
    try:
        for data in a.data:
            teacher = load_teacher(data)
            resolution = teacher.sample_shape[-1] if len(teacher.sample_shape) == 3 else None
            dataset = load_data(data, "train", resolution=resolution)
            key = METRIC[data]
            budget = a.iterations or (LONG_BUDGET if a.regime == "long" else None)
            base = validate_config(DMD2Config, {"teacher": data, **_yaml(ROOT / "configs" / f"dmd2_{data}.yaml")},
                                   f"dmd2_{data}.yaml")
            budget = budget or base.loop.iterations
            student_its = a.student_iterations or budget if "student" in a.start else 0
            if student_its % a.every or (student_its and budget % a.every):
                raise SystemExit(f"--start student: --student-iterations ({student_its}) and the budget ({budget}) "
                                 f"must be multiples of --every ({a.every})")
            db_options = (long_regime(budget, base.ttur, a.record_checkpoints, a.record_share, a.path_share)
                          if a.regime == "long" else {})
            if a.head_along_path:
                db_options = {**db_options, "head_along_path": True}
            for item in a.disback_option:
                name, sep, value = item.partition("=")
                if not sep or name not in DisBackConfig.model_fields:
                    raise SystemExit(f"--disback-option {item!r}: give KEY=VALUE with KEY a DisBack option")
                db_options = {**db_options, name: yaml.safe_load(value)}
            options[data] = db_options
            curves: dict[str, dict[str, list[list[tuple[int, float]]]]] = {
                s: {"dmd2": [], "disback": []} for s in a.start}
            per_rows: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
            for seed in a.seeds:
                student_file = work / f"{data}-student-{seed}.safetensors"
                dmd2_cfg, db_cfg = configs(data, budget, seed, a.every, work, extra=student_its,
                                           disback_options=db_options)
                for start in a.start:
                    recording[f"{data}/{start}"] = db_cfg.recording_iterations()
                print(f"{data} seed {seed}: budget {budget} iterations (+{student_its} of DMD2 for the student); "
                      f"DisBack records {db_cfg.recording_iterations()} ({db_cfg.record_checkpoints} x "
                      f"{db_cfg.record_every}) then distils {db_cfg.loop.iterations}, switching every "
                      f"{db_cfg.switch_every} {db_cfg.switch_unit}", flush=True)
                dmd2_rows = run_curve("dmd2", teacher, dmd2_cfg, dataset, data, a.n, work / f"{data}-dmd2-{seed}",
                                      save_at=student_its or None, save_to=student_file)
                for start in a.start:
                    if start == "teacher":
                        base_rows = [r for r in dmd2_rows if r["iterations"] <= budget]
                        db_rows = run_curve("disback", teacher, db_cfg, dataset, data, a.n,
                                            work / f"{data}-disback-teacher-{seed}")
                        origin = 0
                    else:
                        base_rows = [r for r in dmd2_rows if r["iterations"] >= student_its]
                        _, cfg = configs(data, budget, seed, a.every, work, disback_options=db_options,
                                         init_generator=str(student_file), tag="student")
                        db_rows = run_curve("disback", teacher, cfg, dataset, data, a.n,
                                            work / f"{data}-disback-student-{seed}", offset=student_its)
                        origin = student_its
                    for method, rs in (("dmd2", base_rows), ("disback", db_rows)):
                        rs = [{**r, "variant": start} for r in rs]
                        per_rows.setdefault((start, method), []).append(rs)
                        curves[start][method].append([(r["iterations"] - origin, r[key]) for r in rs])
            for (start, method), seeds_rows in per_rows.items():
                for points in zip(*seeds_rows):  # the same iterations in every seed's curve
                    all_rows.append(average(list(points)))
            for start in a.start:
                name = f"{data}/{start}"
                origin = student_its if start == "student" else 0
                summary[name] = {"start": start, "origin_iteration": origin,
                                 **target_summary(curves[start], key, budget, levels)}
                print(f"{name}: {summary[name]}", flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results(a.name, meta(a.seeds, n=a.n, every=a.every, regime=a.regime, disback_options=options,
                                      target=summary, recording_iterations=recording), all_rows, by_data=True)
    # the plot shows every data set in the results file (earlier runs' too)
    saved = json.loads(path.read_text())
    earlier = saved["meta"].get("earlier", [])
    targets = {**{d: t for e in earlier for d, t in e.get("target", {}).items()}, **saved["meta"].get("target", {})}
    recs = {**{d: r for e in earlier for d, r in e.get("recording_iterations", {}).items()},
            **saved["meta"].get("recording_iterations", {})}
    plot(saved["rows"], targets, recs, RESULTS / f"{a.name}.png")
    for name, t in summary.items():
        data = name.split("/")[0]
        sub = [r for r in all_rows if r["data"] == data and r["variant"] == t["start"]]
        print(f"\n### {name}\n" + markdown_table(sub, ["method", "iterations", METRIC[data], "wall_seconds"]))
        print(f"\niterations to first reach each level (from iteration {t['origin_iteration']}; DisBack's with its "
              f"recording), mean ± std over seeds, reached/seeds:")
        print(markdown_table([{"level": f"{lv['factor']:g} Q = {lv['value']:.4g}",
                               "dmd2": lv["dmd2_mean"], "dmd2_std": lv["dmd2_std"], "dmd2 reached": lv["dmd2_reached"],
                               "disback": lv["disback_mean"], "disback_std": lv["disback_std"],
                               "disback reached": lv["disback_reached"], "disback / dmd2": lv["fraction"]}
                              for lv in t["levels"]],
                             ["level", "dmd2", "dmd2 reached", "disback", "disback reached", "disback / dmd2"]))
        print(f"finals: DMD2 {t['dmd2_final']:.4g}, DisBack {t['disback_final']:.4g}; target "
              f"{'met' if t['met'] else 'not met'} (DisBack at most {TARGET_FRACTION:.0%} of DMD2's iterations to Q "
              f"and ending no worse)")
    print(f"\nwrote {path} and {RESULTS / (a.name + '.png')}")


if __name__ == "__main__":
    run_main(main)
