"""Convergence: DMD2 against DisBack + DMD2, quality every K iterations, same teacher, seeds and budget.

    python benchmarks/convergence.py                          # digits and grid25, seed 0, the configs' budgets
    python benchmarks/convergence.py --data grid25 --seeds 0 1 2 --every 100
    python benchmarks/convergence.py --data grid25 --iterations 600 --every 100 --n 1000   # a quick look

Both methods run the same DMD2 (configs/dmd2_<data>.yaml; DisBack's ``dmd2:`` section is replaced by it, so only the
DisBack options of configs/disback_<data>.yaml differ) from the same teacher, seeds and total budget. The budget is
counted in iterations and **includes DisBack's degradation recording**: DisBack distils for ``budget - N *
record_every`` iterations after recording for ``N * record_every`` (its path is recorded afresh for every run, with
``record_seed`` = the run's seed). Every ``--every`` iterations the generator as it is at that point is sampled and
measured with ``fewstep.api.evaluate`` (FID on digits, sliced Wasserstein distance on grid25; lower is better), through
the training loop's ``sample_fn`` hook. A curve is rows with increasing ``iterations`` (DESIGN.md's result format).

The target (the DisBack paper's claim at our scale): DisBack reaches plain DMD2's final quality within 60% of DMD2's
iterations, and ends no worse; "final quality" is the mean of a curve's last 3 points (one evaluation is noisy once
a curve has flattened). ``meta.target`` says per data set whether it was met.

Writes benchmarks/results/convergence.json and benchmarks/results/convergence.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from common import RESULTS, average, markdown_table, meta, write_results  # noqa: E402

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


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def configs(data: str, budget: int | None, seed: int, every: int, work: Path) -> tuple[DMD2Config, DisBackConfig]:
    """The two runs' configs: DMD2 from configs/dmd2_<data>.yaml, DisBack from configs/disback_<data>.yaml with the
    same DMD2 section, loop and total budget (the recording's iterations taken out of its distillation)."""
    dmd2_data = _yaml(ROOT / "configs" / f"dmd2_{data}.yaml")
    dmd2_data.setdefault("teacher", data)
    dmd2 = validate_config(DMD2Config, dmd2_data, f"dmd2_{data}.yaml")
    budget = budget or dmd2.loop.iterations
    loop = dmd2.loop.model_copy(update={"iterations": budget, "seed": seed, "sample_every": every,
                                        "checkpoint_every": budget, "keep_checkpoints": 1, "progress": False})
    dmd2 = dmd2.model_copy(update={"loop": loop})

    db_data = _yaml(ROOT / "configs" / f"disback_{data}.yaml")
    db_data.setdefault("teacher", data)
    db_data["dmd2"] = {k: v for k, v in dmd2.model_dump(mode="json").items() if k not in SHARED_FIELDS}
    for key in ("teacher", "data", "steps"):
        db_data[key] = getattr(dmd2, key)
    db_data["base"] = "dmd2"
    db_data["record_seed"] = seed
    db_data["path_dir"] = str(work / f"paths-{data}-{seed}")
    db = validate_config(DisBackConfig, db_data, f"disback_{data}.yaml")
    recording = db.recording_iterations()
    if recording >= budget:
        raise SystemExit(f"{data}: the recording's {recording} iterations leave nothing of the {budget}-iteration budget")
    db = db.model_copy(update={"loop": loop.model_copy(update={"iterations": budget - recording})})
    return dmd2, DisBackConfig.model_validate(db.model_dump(mode="json"))


def run_curve(method_name: str, teacher: Any, cfg: Any, dataset: Any, data: str, n: int, out: Path,
              offset: int = 0) -> list[dict[str, Any]]:
    """Train one run, evaluating the generator every ``cfg.loop.sample_every`` iterations (and before the first)."""
    torch.manual_seed(cfg.loop.seed)
    method = (DMD2Method if method_name == "dmd2" else DisBackMethod)(teacher, cfg)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    timing = {"eval": 0.0}

    def measure(iterations: int) -> None:
        t0 = time.perf_counter()
        student = Student(method.inference_model(), method.timesteps)
        metrics = evaluate(student, data=data, n=n, seed=1234)
        timing["eval"] += time.perf_counter() - t0
        rows.append({"data": data, "method": method_name, "variant": "full", "steps": student.steps,
                     **{k: metrics.get(k) for k in ("nfe", "fid", "precision", "recall", "class_accuracy",
                                                    "sliced_w", "modes_covered", "high_quality")},
                     "iterations": iterations,
                     "wall_seconds": round(time.perf_counter() - start - timing["eval"], 2)})
        key = METRIC[data]
        print(f"  {data:>7} {method_name:>8} it {iterations:>5}  {key} {rows[-1][key]:.4g}", flush=True)

    measure(0)
    if method_name == "disback":
        method.to(torch.device("cpu"))  # the recording happens here (the loop would do it on its device)
        if offset:
            rows.append({**rows[-1], "iterations": offset,
                         "wall_seconds": round(time.perf_counter() - start - timing["eval"], 2)})
    train(method, dataset, cfg.loop, out, sample_fn=lambda step, _path: measure(offset + step), config=cfg)
    return rows


def target_summary(rows: list[dict[str, Any]], data: str, budget: int, last: int = 3) -> dict[str, Any]:
    """Whether DisBack reached DMD2's final quality within 60% of DMD2's iterations and ended no worse.

    A single evaluation is noisy once a curve has flattened, so "final quality" is the mean of each curve's last
    ``last`` points; DisBack "reaches" it at the first measured iteration whose value is at least as good."""
    key = METRIC[data]
    dmd2 = [r for r in rows if r["method"] == "dmd2"]
    db = [r for r in rows if r["method"] == "disback"]
    dmd2_final = sum(r[key] for r in dmd2[-last:]) / len(dmd2[-last:])
    db_final = sum(r[key] for r in db[-last:]) / len(db[-last:])
    reached = next((r["iterations"] for r in db if r[key] <= dmd2_final), None)
    dmd2_reached = next((r["iterations"] for r in dmd2 if r[key] <= dmd2_final), None)
    fraction = None if reached is None else reached / budget
    return {"metric": key, "budget": budget, "final_is_mean_of_last": last,
            "dmd2_final": dmd2_final, "disback_final": db_final,
            "dmd2_last_point": dmd2[-1][key], "disback_last_point": db[-1][key],
            "dmd2_iterations_to_its_final": dmd2_reached,
            "disback_iterations_to_dmd2_final": reached, "fraction_of_dmd2_iterations": fraction,
            "reached_within_60pct": fraction is not None and fraction <= TARGET_FRACTION,
            "ends_no_worse": db_final <= dmd2_final,
            "met": fraction is not None and fraction <= TARGET_FRACTION and db_final <= dmd2_final}


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], recording: dict[str, int], path: Path) -> None:
    from matplotlib.figure import Figure

    from fewstep.io import atomic_write_bytes

    datas = list(summary)
    fig = Figure(figsize=(5.5 * len(datas), 3.8))
    for i, data in enumerate(datas):
        ax = fig.add_subplot(1, len(datas), i + 1)
        key = summary[data]["metric"]
        for method, style in (("dmd2", "-o"), ("disback", "-s")):
            pts = [(r["iterations"], r[key]) for r in rows if r["data"] == data and r["method"] == method]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, markersize=3, label="DMD2" if method == "dmd2" else "DisBack + DMD2")
        budget = summary[data]["budget"]
        ax.axhline(summary[data]["dmd2_final"], color="grey", ls="--", lw=0.8, label="DMD2 final (mean of last 3)")
        ax.axvline(TARGET_FRACTION * budget, color="grey", ls=":", lw=0.8, label=f"{TARGET_FRACTION:.0%} of budget")
        if recording.get(data):
            ax.axvspan(0, recording[data], color="tab:orange", alpha=0.12, label="DisBack recording")
        ax.set_yscale("log")
        ax.set_xlabel("iterations (recording included)")
        ax.set_ylabel(key)
        ax.set_title(f"{data}: target {'met' if summary[data]['met'] else 'not met'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--iterations", type=int, default=None,
                   help="total budget of each method (default: the DMD2 config's loop.iterations)")
    p.add_argument("--every", type=int, default=100, help="measure quality every this many iterations (K)")
    p.add_argument("--n", type=int, default=2000, help="evaluation samples per point")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: a temp folder)")
    a = p.parse_args()

    work = a.keep or Path(tempfile.mkdtemp(prefix="fewstep-convergence-"))
    all_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    recording: dict[str, int] = {}
    try:
        for data in a.data:
            teacher = load_teacher(data)
            resolution = teacher.sample_shape[-1] if len(teacher.sample_shape) == 3 else None
            dataset = load_data(data, "train", resolution=resolution)
            per_method: dict[str, list[list[dict[str, Any]]]] = {"dmd2": [], "disback": []}
            budget = 0
            for seed in a.seeds:
                dmd2_cfg, db_cfg = configs(data, a.iterations, seed, a.every, work)
                budget = dmd2_cfg.loop.iterations
                recording[data] = db_cfg.recording_iterations()
                print(f"{data} seed {seed}: budget {budget} iterations; DisBack records {recording[data]} "
                      f"({db_cfg.record_checkpoints} x {db_cfg.record_every}) then distils {db_cfg.loop.iterations}, "
                      f"switching every {db_cfg.switch_every}", flush=True)
                per_method["dmd2"].append(run_curve("dmd2", teacher, dmd2_cfg, dataset, data, a.n,
                                                    work / f"{data}-dmd2-{seed}"))
                per_method["disback"].append(run_curve("disback", teacher, db_cfg, dataset, data, a.n,
                                                       work / f"{data}-disback-{seed}", offset=recording[data]))
            rows = []
            for method, curves in per_method.items():
                for points in zip(*curves):  # the same iterations in every seed's curve
                    rows.append(average(list(points)))
            all_rows.extend(rows)
            summary[data] = target_summary(rows, data, budget)
            print(f"{data}: {summary[data]}", flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results("convergence", meta(a.seeds, n=a.n, every=a.every, target=summary,
                                             recording_iterations=recording), all_rows, by_data=True)
    # the plot shows every data set in the results file (earlier runs' too)
    import json

    saved = json.loads(path.read_text())
    targets = {**{d: t for e in saved["meta"].get("earlier", []) for d, t in e.get("target", {}).items()},
               **saved["meta"].get("target", {})}
    recs = {**{d: r for e in saved["meta"].get("earlier", []) for d, r in e.get("recording_iterations", {}).items()},
            **saved["meta"].get("recording_iterations", {})}
    targets = {d: t for d, t in targets.items() if any(r["data"] == d for r in saved["rows"])}
    plot(saved["rows"], targets, recs, RESULTS / "convergence.png")
    for data in a.data:
        sub = [r for r in all_rows if r["data"] == data]
        print(f"\n### {data}\n" + markdown_table(sub, ["method", "iterations", METRIC[data], "wall_seconds"]))
        t = summary[data]
        print(f"DisBack reaches DMD2's final {t['metric']} ({t['dmd2_final']:.4g}, mean of its last "
              f"{t['final_is_mean_of_last']} points; DMD2 itself first gets there at "
              f"{t['dmd2_iterations_to_its_final']}) at "
              f"{t['disback_iterations_to_dmd2_final']} of {t['budget']} iterations; ends at {t['disback_final']:.4g}; "
              f"target {'met' if t['met'] else 'not met'}")
    print(f"\nwrote {path} and {RESULTS / 'convergence.png'}")


if __name__ == "__main__":
    main()
