"""ADD against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/add.py                       # digits and grid25, seed 0
    python benchmarks/add.py --data grid25 --seeds 0 1 2

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM), as in benchmarks/dmd2.py; ADD 1-step and 4-step
("full"; the 4-step row is a separate 4-step run so that it reads like DMD2's); the 1-step ablations adversarial only
(``distill_weight: 0``) and distillation only (``adversarial: false``). Each distillation run uses the shipped config
for its data (configs/add_<data>.yaml), so the budget is the same for every variant. Writes
benchmarks/results/add.json and prints the README table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import average, markdown_table, meta, write_results  # noqa: E402

from fewstep.api import evaluate, load_teacher  # noqa: E402
from fewstep.distillation import distill  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (steps, config overrides)
    "full": (1, {}),
    "full-4step": (4, {}),
    "adv_only": (1, {"distill_weight": 0.0}),
    "distill_only": (1, {"adversarial": False}),
}
TEACHER_SETTINGS = [("ddim", 1), ("ddim", 2), ("ddim", 4), ("heun", 32)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--n", type=int, default=2000, help="evaluation samples")
    p.add_argument("--iterations", type=int, default=None, help="override the configs' iterations (quick runs)")
    a = p.parse_args()

    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    try:
        for data in a.data:
            teacher = load_teacher(data)
            for sampler, steps in TEACHER_SETTINGS:
                per_seed = [{"data": data, "method": "teacher", "variant": sampler, "steps": steps,
                             **evaluate(teacher, n=a.n, steps=steps, sampler=sampler, seed=s),
                             "iterations": None, "wall_seconds": None} for s in a.seeds]
                rows.append(average(per_seed))
                print(_line(rows[-1]), flush=True)
            config = ROOT / "configs" / f"add_{data}.yaml"
            for variant in a.variants:
                steps, overrides = VARIANTS[variant]
                per_seed = []
                for seed in a.seeds:
                    out = work / f"{data}-{variant}-{seed}"
                    start = time.perf_counter()
                    student = distill(data, "add", steps=steps, out=out, config=config if config.exists() else None,
                                      seed=seed, iterations=a.iterations, progress=False, evaluate_n=0, **overrides)
                    wall = time.perf_counter() - start
                    metrics = evaluate(student, n=a.n, seed=seed)
                    per_seed.append({"data": data, "method": "add", "variant": variant.replace("-4step", ""),
                                     "steps": steps, **metrics, "iterations": student.info["meta"]["iterations"],
                                     "wall_seconds": wall})
                rows.append(average(per_seed))
                print(_line(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results("add", meta(a.seeds, n=a.n), rows)
    for data in a.data:
        sub = [r for r in rows if r["data"] == data]
        cols = (["method", "variant", "steps", "nfe", "fid", "precision", "recall", "class_accuracy", "wall_seconds"]
                if sub[0].get("fid") is not None else
                ["method", "variant", "steps", "nfe", "sliced_w", "modes_covered", "high_quality", "wall_seconds"])
        print(f"\n### {data}\n" + markdown_table(sub, cols))
    print(f"\nwrote {path}")


def _line(r: dict) -> str:
    key = "fid" if r.get("fid") is not None else "sliced_w"
    return (f"{r['data']:>8} {r['method']:>8} {r['variant']:>12} steps {r['steps']:>2} nfe {r['nfe']:>3}  "
            f"{key} {r[key]:.4g}")


if __name__ == "__main__":
    main()
