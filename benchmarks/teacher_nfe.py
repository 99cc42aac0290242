"""The embedded teachers' quality against NFE for DDIM, Euler and Heun: the baseline every method is measured against.

    python benchmarks/teacher_nfe.py                   # all embedded teachers, seeds 0 1 2
    python benchmarks/teacher_nfe.py --data digits --seeds 0

Prints a table, writes benchmarks/results/teacher_nfe.json (DESIGN.md's result format) and teacher_nfe.png.
NFE counts network evaluations per sample; Heun takes 2n - 1 of them for n steps, so its NFE targets round to odd
numbers. The teachers are sampled without guidance (cfg 1).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, average, markdown_table, meta, write_results, run_main  # noqa: E402

from fewstep import generate, load_teacher  # noqa: E402
from fewstep.data import load_data  # noqa: E402
from fewstep.diffusion.samplers import SAMPLERS  # noqa: E402
from fewstep.eval.evaluate import evaluate_against  # noqa: E402
from fewstep.eval.images import plot_curves  # noqa: E402

NFES = (1, 2, 4, 8, 16, 32, 64)
ALL_DATA = ("digits", "ring8", "grid25", "moons", "checkerboard", "swissroll")


def steps_for(sampler: str, target_nfe: int) -> int:
    return max(1, (target_nfe + 1) // 2) if sampler == "heun" else target_nfe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=list(ALL_DATA))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-images", type=int, default=2000, help="samples per setting for image data")
    p.add_argument("--n-points", type=int, default=5000, help="samples per setting for 2-D data")
    a = p.parse_args()

    rows = []
    for data in a.data:
        teacher = load_teacher(data)
        test = load_data(data, "test")
        n = a.n_images if test.kind == "image" else a.n_points
        for sampler in SAMPLERS:
            for steps in sorted({steps_for(sampler, t) for t in NFES}):
                per_seed = []
                for seed in a.seeds:
                    start = time.perf_counter()
                    x, labels, timing = generate(teacher, n, steps=steps, sampler=sampler, seed=seed)
                    metrics = evaluate_against(x, data, labels=labels)
                    per_seed.append({"data": data, "method": "teacher", "variant": sampler, "steps": steps,
                                     **timing, **metrics, "iterations": None,
                                     "wall_seconds": time.perf_counter() - start})
                row = average(per_seed)
                rows.append(row)
                key = "fid" if test.kind == "image" else "sliced_w"
                print(f"{data:>12} {sampler:>5} steps {steps:>3} nfe {row['nfe']:>3}  {key} {row[key]:.4g}", flush=True)
    path = write_results("teacher_nfe", meta(a.seeds, n_images=a.n_images, n_points=a.n_points), rows)
    for data in a.data:
        sub = [r for r in rows if r["data"] == data]
        image = "fid" in sub[0] and sub[0]["fid"] is not None
        cols = (["variant", "steps", "nfe", "fid", "precision", "recall", "class_accuracy"] if image
                else ["variant", "steps", "nfe", "sliced_w", "modes_covered", "high_quality"])
        print(f"\n### {data}\n" + markdown_table(sub, cols))
        curves = [{**r, "series": r["variant"]} for r in sub]
        for sampler in SAMPLERS:
            pts = [r for r in curves if r["variant"] == sampler]
            for r in pts:
                r[f"{sampler}"] = r["fid" if image else "sliced_w"]
        plot_curves(curves, list(SAMPLERS), RESULTS / f"teacher_nfe_{data}.png", x="nfe",
                    title=f"{data} teacher: {'FID' if image else 'sliced W'} against NFE")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    run_main(main)
