"""DMD2 against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/dmd2.py                                  # digits and grid25, seed 0
    python benchmarks/dmd2.py --seeds 0 1 2                    # the README's table: mean ± std over 3 seeds
    python benchmarks/dmd2.py --data grid25 --iterations 20 --n 200   # a smoke run

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM); DMD2 students of 1, 2 and 4 steps with the per-step
fake score (``full``: ``fake_score: per_step``, the default) and with one shared fake score (``shared``: the DMD2
code; at 1 step the two are the same run, so ``full`` 1-step stands for both); 1-step ablations without TTUR
(ttur 1), without the GAN head, and DMD (v1: no TTUR, no GAN, L2 regression to teacher ODE pairs). Every k-step
student also gets one row per step (variant ``<variant>@step<i>``): the quality of its step-i output (the first i
steps of its own sampler, same seeds), and ``<variant>@pooled`` all steps' outputs together (n / k of each): the
per-step table of issue 16. Each distillation run uses the shipped config
for its data (configs/dmd2_<data>.yaml), so the budget is the same for every variant. Writes
benchmarks/results/dmd2.json and prints the README tables.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, average, benchmark_parser, meta, print_tables, row_line, teacher_rows,  # noqa: E402
                    write_results)

VARIANTS = {  # name: (steps, config overrides); "<variant>-<k>step" is reported as <variant> with steps k
    "full": (1, {}),
    "full-2step": (2, {"fake_score": "per_step"}),
    "full-4step": (4, {"fake_score": "per_step"}),
    "shared-2step": (2, {"fake_score": "shared"}),
    "shared-4step": (4, {"fake_score": "shared"}),
    "no_ttur": (1, {"ttur": 1}),
    "no_gan": (1, {"gan": False}),
    "dmd_v1": (1, {"ttur": 1, "gan": False, "regression": True}),
}


def step_students(student):
    """The k-step student's first i steps as students of their own (i = 1..k): their output is step i's."""
    from fewstep.student import Student

    return [Student(student.generator, student.timesteps[: i + 1], info=student.info) for i in range(student.steps)]


def pooled_metrics(student, data: str, n: int, seed: int) -> dict:
    """The metrics of all k steps' outputs pooled: ``n // k`` samples of each step's output (same seed), ``n`` in all,
    so the row compares with the per-step ones (the mixture a shared fake score matches)."""
    import torch

    from fewstep.data import load_data
    from fewstep.eval import evaluate_samples

    k, m = student.steps, n // student.steps
    labels = torch.arange(m) % student.num_classes if student.num_classes > 0 else None
    x = torch.cat([s.sample(m, labels=labels, seed=seed) for s in step_students(student)])
    shape = student.sample_shape
    test = load_data(data, "test", resolution=shape[-1] if len(shape) == 3 else None)
    return {**evaluate_samples(x, test, labels=None if labels is None else labels.repeat(k)), "nfe": None}


def main() -> None:
    from fewstep.api import evaluate
    from fewstep.distillation import distill

    a = benchmark_parser(__doc__, VARIANTS).parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    try:
        for data in a.data:
            rows.extend(teacher_rows(data, a.seeds, a.n))
            config = ROOT / "configs" / f"dmd2_{data}.yaml"
            for variant in a.variants:
                steps, overrides = VARIANTS[variant]
                name = variant.rsplit("-", 1)[0] if variant.endswith("step") else variant
                per_seed, per_step = [], []
                for seed in a.seeds:
                    start = time.perf_counter()
                    student = distill(data, "dmd2", steps=steps, out=work / f"{data}-{variant}-{seed}",
                                      config=config if config.exists() else None, seed=seed,
                                      iterations=a.iterations, progress=False, evaluate_n=0, **overrides)
                    wall = time.perf_counter() - start
                    common = {"data": data, "method": "dmd2", "steps": steps,
                              "iterations": student.info["meta"]["iterations"]}
                    per_seed.append({**common, "variant": name, **evaluate(student, n=a.n, seed=seed),
                                     "wall_seconds": wall})
                    if steps > 1:
                        # steps: the student's k; nfe: the i steps its step-i output took
                        per_step.append([{**evaluate(s, n=a.n, seed=seed), **common,
                                          "variant": f"{name}@step{i + 1}", "wall_seconds": None}
                                         for i, s in enumerate(step_students(student))]
                                        + [{**pooled_metrics(student, data, a.n, seed), **common,
                                            "variant": f"{name}@pooled", "wall_seconds": None}])
                rows.append(average(per_seed))
                print(row_line(rows[-1]), flush=True)
                for i in range(steps + 1 if steps > 1 else 0):  # each step, then the pooled outputs
                    rows.append(average([seed_rows[i] for seed_rows in per_step]))
                    print(row_line({**rows[-1], "nfe": rows[-1]["nfe"] or "-"}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results("dmd2", meta(a.seeds, n=a.n), rows)
    print_tables(rows, a.data)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
