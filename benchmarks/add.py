"""ADD against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/add.py                       # digits and grid25, seed 0
    python benchmarks/add.py --data grid25 --seeds 0 1 2

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM), as in benchmarks/dmd2.py; ADD 1-step and 4-step
("full"; the 4-step row is a separate 4-step run so that it reads like DMD2's); the 1-step ablations adversarial only
(``distill_weight: 0``) and distillation only (``adversarial: false``). Each distillation run uses the shipped config
for its data (configs/add_<data>.yaml), so the budget and the feature network are the same for every variant: the
teacher's encoder on digits (not the classifier digits FID reads), a fixed random MLP on grid25. Writes
benchmarks/results/add.json and prints the README table.

The lambda sweep (issue 17): ``python benchmarks/add.py sweep --data digits grid25 --seeds 0 1 2``

* For each reduction of L_distill (``distill_reduction`` ``sum``: the paper's ||x - y||^2; ``mean``: 1/D of it) a
  calibration run (``--calibration-iterations``, seed 0, the config's lambda) measures the logged gradient ratio
  ``generator/grad_ratio`` = lambda ||dL_distill/dx|| / ||dL_adv/dx||, the mean of its rows in the run's second half;
  the ratio is linear in lambda at a fixed state, so lambda = r * lambda_0 / ratio_0 aims at ratio r, for each r of
  ``--ratios`` (0.1 0.3 1 3). ``--lambdas-sum`` / ``--lambdas-mean`` give the lambdas instead (no calibration).
* Every (reduction, lambda) trains 1-step ADD over ``--seeds`` with the shipped config's feature network, one FID
  does not read (digits: the teacher's encoder, the default; grid25: a random MLP, and grid25 is measured by sliced
  W); each row keeps the ratio and cosine the run itself logged (mean over its rows). Evaluation:
  ``fewstep.api.evaluate`` (digits FID against the train split, ``fid_heldout`` beside it).
* The default: the (reduction, lambda) with the best mean rank over the data sets (lower FID / sliced W), or
  ``--default sum:2.5``. The ablation at it: adversarial only (``distill_weight: 0``) and distillation only
  (``adversarial: false``), same seeds; ``meta.ablation`` gives, per data set, full's margin over each in units of
  the std of the difference (sqrt(std_a^2 + std_b^2)); more than 2 counts as beating it.

Writes benchmarks/results/add_sweep.json (``--name`` another) and prints its tables.

Where a k-step ADD student goes wrong: ``python benchmarks/add.py times --data grid25 --seeds 0 1 2``

* ADD trains one network at its ``student_times`` (999, 749, 499, 249) whatever its steps, so one 1-step run per seed
  and variant (``full``, the shipped config; ``no_image_conditioning``, ``image_conditioning: false``: the heads not
  projected on ``c_img``; ``image_conditioning_alpha_0.5``: ``c_img`` only where ``alpha_s >= 0.5``, at 249 of
  grid25's times) is measured twice: as the 1-, 2- and 4-step student (rows ``<variant>``, steps k) and, at
  each training time s, on its own training input (rows ``<variant>@t<s>``): ``G(x_s, s)`` with ``x_s`` the train
  split noised to s (pure noise at the first time, as training draws it), against the same reference as the
  students. A student that fails only on re-noised samples of its own points the sampler out; one that fails on
  real ``x_s`` as well has learned the wrong map at that time.

Writes benchmarks/results/add_times.json and prints its table.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, average, finished_run, fmt, keep_run, markdown_table, meta, method_benchmark,  # noqa: E402
                    run_main, write_results)

VARIANTS = {  # name: (steps, config overrides)
    "full": (1, {}),
    "full-4step": (4, {}),
    "adv_only": (1, {"distill_weight": 0.0}),
    "distill_only": (1, {"adversarial": False}),
}


METRIC = {"digits": "fid", "grid25": "sliced_w"}  # lower is better
RATIOS = (0.1, 0.3, 1.0, 3.0)


def logged(run_dir: Path, second_half: bool = False) -> dict[str, float | None]:
    """The mean ``generator/grad_ratio`` and ``generator/grad_cos`` of a run's metrics rows (or of its second half)."""
    from fewstep.train import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "generator/grad_ratio" in r]
    if second_half and rows:
        rows = [r for r in rows if r["it"] > rows[-1]["it"] / 2] or rows[-1:]
    mean = lambda k: statistics.fmean(r[k] for r in rows) if rows else None  # noqa: E731
    return {"grad_ratio": mean("generator/grad_ratio"), "grad_cos": mean("generator/grad_cos")}


def run(data: str, work: Path, name: str, seed: int, iterations: int | None, n: int | None,
        **overrides: Any) -> tuple[dict[str, Any], Path]:
    """One 1-step ADD run with the shipped config and ``overrides``; its evaluation (None: not evaluated).

    The row is kept beside the run (``bench_row.json``); a run whose row is there, for the same config file, overrides,
    iterations and ``n``, is not trained again (``sweep --keep``: an interrupted sweep goes on where it stopped)."""
    from fewstep.api import evaluate
    from fewstep.distillation import distill

    config = ROOT / "configs" / f"add_{data}.yaml"
    out = work / f"{data}-{name}-{seed}"
    key = {"config": config.read_text(), "overrides": overrides, "iterations": iterations, "n": n, "seed": seed}
    row = finished_run(out, "bench_row.json", key)
    if row is not None:
        return row, out
    start = time.perf_counter()
    student = distill(data, "add", steps=1, out=out, config=config, seed=seed, iterations=iterations,
                      progress=False, evaluate_n=0, **overrides)
    row = {"iterations": student.info["meta"]["iterations"], "wall_seconds": round(time.perf_counter() - start, 2)}
    if n:
        row.update(evaluate(student, n=n, seed=seed))
    keep_run(out, "bench_row.json", key, row)
    return row, out


def calibrate(data: str, reduction: str, work: Path, iterations: int, ratios: Iterable[float]) -> dict[str, Any]:
    """lambda for each target ratio from one short run at the config's lambda (see the module docstring)."""
    from fewstep.config import load_config
    from fewstep.methods.add import ADDConfig

    lam0 = load_config(ROOT / "configs" / f"add_{data}.yaml", ADDConfig).distill_weight
    _, out = run(data, work, f"calibrate-{reduction}", 0, iterations, None, distill_reduction=reduction,
                 distill_weight=lam0)
    ratio0 = logged(out, second_half=True)["grad_ratio"]
    if not ratio0:
        raise SystemExit(f"{data} {reduction}: the calibration run logged no generator/grad_ratio; give more "
                         f"--calibration-iterations (at least loop.log_every) or --lambdas-{reduction}")
    lambdas = [r * lam0 / ratio0 for r in ratios]
    print(f"{data} {reduction}: lambda {lam0:g} gives ratio {ratio0:.4g} after {iterations} iterations -> lambdas "
          + ", ".join(f"{lam:.4g} (ratio {r:g})" for lam, r in zip(lambdas, ratios)), flush=True)
    return {"lambda": lam0, "iterations": iterations, "grad_ratio": ratio0, "lambdas": lambdas}


def significance(full: dict[str, Any], other: dict[str, Any], key: str) -> dict[str, Any]:
    """Full's margin over ``other`` (lower is better) in units of the difference's std."""
    margin = other[key] - full[key]
    std = math.sqrt(full.get(f"{key}_std", 0.0) ** 2 + other.get(f"{key}_std", 0.0) ** 2)
    z = margin / std if std > 0 else None
    return {"margin": margin, "std_of_difference": std, "margin_in_std": z, "beats_by_2_std": z is not None and z > 2}


def sweep(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="ADD's lambda sweep and its ablation (see benchmarks/add.py)")
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--reductions", nargs="+", default=["sum", "mean"], choices=["sum", "mean"])
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS),
                   help="gradient ratios lambda ||dL_distill/dx|| / ||dL_adv/dx|| the lambdas aim at")
    p.add_argument("--lambdas-sum", nargs="+", type=float, default=None, help="the sum lambdas (no calibration)")
    p.add_argument("--lambdas-mean", nargs="+", type=float, default=None, help="the mean lambdas (no calibration)")
    p.add_argument("--calibration-iterations", type=int, default=200)
    p.add_argument("--default", default=None,
                   help="REDUCTION:LAMBDA (or REDUCTION:ratioR, a calibrated target ratio) for the ablation "
                        "(default: the sweep's best)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the runs here and reuse the finished ones (default: a temp folder, removed)")
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--iterations", type=int, default=None, help="override the configs' iterations (quick runs)")
    p.add_argument("--name", default="add_sweep", help="results file benchmarks/results/<name>.json")
    a = p.parse_args(argv)

    rows: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {}
    work = a.keep or Path(tempfile.mkdtemp(prefix="fewstep-add-sweep-"))
    work.mkdir(parents=True, exist_ok=True)

    def measure(data: str, variant: str, **overrides: Any) -> dict[str, Any]:
        per_seed = []
        for seed in a.seeds:
            row, out = run(data, work, variant, seed, a.iterations, a.n, **overrides)
            per_seed.append({"data": data, "method": "add", "variant": variant, "steps": 1,
                             "distill_reduction": overrides.get("distill_reduction"),
                             "distill_weight": overrides.get("distill_weight"), **row, **logged(out)})
        rows.append(average(per_seed))
        r = rows[-1]
        write_results(a.name, meta(a.seeds, n=a.n, iterations=a.iterations, partial=True), [r])  # as rows land
        print(f"  {data:>7} {variant:<28} {METRIC[data]} {fmt(r[METRIC[data]], r.get(METRIC[data] + '_std'))}  "
              f"ratio {fmt(r.get('grad_ratio'))} cos {fmt(r.get('grad_cos'))}", flush=True)
        return r

    try:
        sweep_rows: dict[str, list[dict[str, Any]]] = {}
        for data in a.data:
            calibration[data] = {}
            for reduction in a.reductions:
                given = getattr(a, f"lambdas_{reduction}")
                if given is None:
                    calibration[data][reduction] = calibrate(data, reduction, work, a.calibration_iterations,
                                                             a.ratios)
                    lambdas, aims = calibration[data][reduction]["lambdas"], a.ratios
                else:
                    lambdas, aims = given, [None] * len(given)
                for lam, aim in zip(lambdas, aims):
                    r = measure(data, f"{reduction}-lambda{lam:.4g}", distill_reduction=reduction,
                                distill_weight=lam)
                    r["target_ratio"] = aim
                    # calibrated lambdas differ per data set: a setting is then its reduction and target ratio
                    setting = f"{reduction}:ratio{aim:g}" if aim is not None else f"{reduction}:{lam:.6g}"
                    sweep_rows.setdefault(setting, []).append(r)
        if a.default is not None:
            chosen_key, why = a.default, "given with --default"
        else:  # the best mean rank over the data sets, among the settings run on every data set
            complete = {k: v for k, v in sweep_rows.items() if len(v) == len(a.data)}
            if not complete:
                raise SystemExit("no sweep setting ran on every data set: give --default REDUCTION:LAMBDA")
            rank = {k: 0.0 for k in complete}
            for data in a.data:
                order = sorted(complete, key=lambda k: next(r for r in complete[k] if r["data"] == data)[METRIC[data]])
                for i, k in enumerate(order):
                    rank[k] += i / len(a.data)
            chosen_key = min(rank, key=rank.get)
            why = f"best mean rank over {a.data} ({rank[chosen_key]:.2f}; 0 = best on every data set)"
        reduction, value = chosen_key.split(":")
        lambdas_of = {}  # the chosen lambda per data set
        for data in a.data:
            if value.startswith("ratio"):
                aim = float(value[len("ratio"):])
                cal = calibration.get(data, {}).get(reduction)
                if cal is None:
                    raise SystemExit(f"--default {chosen_key}: no {reduction} calibration for {data}")
                lambdas_of[data] = cal["lambdas"][min(range(len(a.ratios)), key=lambda i: abs(a.ratios[i] - aim))]
            else:
                lambdas_of[data] = float(value)
        chosen = (reduction, chosen_key)
        print(f"default: distill_reduction {reduction}, {value} -> lambda "
              + ", ".join(f"{d} {lam:.4g}" for d, lam in lambdas_of.items()) + f" ({why})", flush=True)
        ablation: dict[str, Any] = {}
        for data in a.data:
            lam = lambdas_of[data]
            full = next((r for r in rows if r["data"] == data and r["distill_reduction"] == reduction
                         and r["distill_weight"] is not None and math.isclose(r["distill_weight"], lam,
                                                                               rel_tol=1e-4)), None)
            if full is None:
                full = measure(data, f"{reduction}-lambda{lam:.4g}", distill_reduction=reduction, distill_weight=lam)
            adv = measure(data, "adv_only", distill_reduction=reduction, distill_weight=0.0)
            dist = measure(data, "distill_only", distill_reduction=reduction, distill_weight=lam,
                           adversarial=False)
            key = METRIC[data]
            ablation[data] = {"metric": key, "full": full["variant"], "full_grad_ratio": full.get("grad_ratio"),
                              "vs_adv_only": significance(full, adv, key),
                              "vs_distill_only": significance(full, dist, key)}
            print(f"{data}: {ablation[data]}", flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results(a.name, meta(a.seeds, n=a.n, iterations=a.iterations, calibration=calibration,
                                      default={"distill_reduction": reduction, "setting": chosen[1],
                                               "distill_weight": lambdas_of, "why": why}, ablation=ablation), rows)
    for data in a.data:
        sub = [r for r in rows if r["data"] == data]
        print(f"\n### {data}\n" + markdown_table(sub, ["variant", "distill_weight", "target_ratio", "grad_ratio",
                                                        "grad_cos", METRIC[data], "wall_seconds"]))
    print(f"\nwrote {path}")


TIMES_VARIANTS = {"full": {}, "no_image_conditioning": {"image_conditioning": False},
                  "image_conditioning_alpha_0.5": {"image_conditioning_min_alpha": 0.5}}


def at_training_times(student: Any, student_times: int, data: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``G(x_s, s)`` at each of ADD's ``student_times`` training times s on the train split noised to s (pure noise
    at the first time, as ``ADDMethod._student_input`` draws it): the metrics of ``fewstep.api.evaluate`` against
    its reference (``evaluate_against``), one dict per time."""
    import torch

    from fewstep.data import load_data
    from fewstep.diffusion.samplers import initial_noise, student_timesteps
    from fewstep.eval.evaluate import evaluate_against

    gen, schedule = student.generator, student.schedule
    train = load_data(data, split="train")
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(train.x), (n,), generator=g)
    x0, labels = train.x[index], None if train.labels is None else train.labels[index]
    eps = torch.randn(x0.shape, generator=g)
    times = student_timesteps(schedule, student_times)
    out = []
    device = next(gen.parameters()).device
    gen.eval()
    for i, t in enumerate(times.tolist()):
        s = torch.full((n,), t)
        x_s = initial_noise(schedule, eps, t) if i == 0 else schedule.add_noise(x0, eps, s)
        with torch.no_grad():
            x = torch.cat([gen(x_s[j:j + 500].to(device), s[j:j + 500].to(device),
                               None if labels is None else labels[j:j + 500].to(device)).cpu()
                           for j in range(0, n, 500)])
        out.append({"t": t, "alpha": float(schedule.alpha_sigma(torch.tensor(t))[0]),
                    **evaluate_against(x, data, labels)})
    return out


def times(argv: list[str]) -> None:
    import yaml

    from fewstep.api import evaluate
    from fewstep.bench.runs import sampled_at
    from fewstep.student import load_student

    p = argparse.ArgumentParser(description="ADD's k-step students and its network at each training time "
                                            "(see benchmarks/add.py)")
    p.add_argument("--data", nargs="+", default=["grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(TIMES_VARIANTS), choices=list(TIMES_VARIANTS))
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the runs here and reuse the finished ones (default: a temp folder, removed)")
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--iterations", type=int, default=None, help="override the configs' iterations (quick runs)")
    a = p.parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="fewstep-add-times-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for data in a.data:
            for variant in a.variants:
                per_row: dict[tuple[str, int], list[dict[str, Any]]] = {}
                for seed in a.seeds:
                    row, out = run(data, work, variant, seed, a.iterations, None, **TIMES_VARIANTS[variant])
                    student = load_student(out)
                    student_times = yaml.safe_load((out / "config.yaml").read_text())["student_times"]
                    for k in (1, 2, 4):
                        per_row.setdefault((variant, k), []).append(
                            {**evaluate(sampled_at(student, k), n=a.n, seed=seed), "wall_seconds": row["wall_seconds"]})
                    for r in at_training_times(student, student_times, data, a.n, seed):
                        per_row.setdefault((f"{variant}@t{r['t']:g}", 1), []).append(r)
                for (name, k), seed_rows in per_row.items():
                    rows.append(average([{**r, "data": data, "method": "add", "variant": name, "steps": k}
                                         for r in seed_rows]))
                r = [x for x in rows if x["data"] == data and x["variant"] == variant]
                print(f"  {data:>7} {variant:<24} " + "  ".join(
                    f"{x['steps']}-step {METRIC[data]} {fmt(x[METRIC[data]], x.get(METRIC[data] + '_std'))}"
                    for x in r), flush=True)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results("add_times", meta(a.seeds, n=a.n, iterations=a.iterations), rows)
    for data in a.data:
        sub = [r for r in rows if r["data"] == data]
        extra = ["modes_covered", "high_quality"] if METRIC[data] == "sliced_w" else ["fid_heldout", "precision",
                                                                                     "recall"]
        print(f"\n### {data}\n" + markdown_table(sub, ["variant", "steps", "alpha", METRIC[data], *extra]))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        run_main(lambda: sweep(sys.argv[2:]))
    elif sys.argv[1:2] == ["times"]:
        run_main(lambda: times(sys.argv[2:]))
    else:
        run_main(lambda: method_benchmark("add", VARIANTS, __doc__))
