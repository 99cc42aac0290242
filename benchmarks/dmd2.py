"""DMD2 against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/dmd2.py                                  # digits and grid25, seed 0
    python benchmarks/dmd2.py --seeds 0 1 2                    # the README's table: mean ± std over 3 seeds
    python benchmarks/dmd2.py --data grid25 --iterations 20 --n 200   # a smoke run

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM); DMD2 students of 1, 2 and 4 steps with the per-step
fake score (``full``: ``fake_score: per_step``, the default) and with one shared fake score (``shared``: the DMD2
code; at 1 step the two are the same run, so ``full`` 1-step stands for both); 1-step ablations without TTUR
(ttur 1), without the GAN head, and DMD (v1: no TTUR, no GAN, L2 regression to teacher ODE pairs); ``fake_t_uniform``
(1 and 4 steps): the fake score's noise levels as the DMD2 EDM code draws them (``fake_t_distribution:
uniform_index``). Every k-step
student also gets one row per step (variant ``<variant>@step<i>``): the quality of its step-i output (the first i
steps of its own sampler, same seeds), and ``<variant>@pooled`` all steps' outputs together (n / k of each): the
per-step table of issue 16. Each distillation run uses the shipped config
for its data (configs/dmd2_<data>.yaml), so the budget is the same for every variant. Writes
benchmarks/results/dmd2.json and prints the README tables.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import method_benchmark, run_main  # noqa: E402

VARIANTS = {  # name: (steps, config overrides); "<variant>-<k>step" is reported as <variant> with steps k
    "full": (1, {}),
    "full-2step": (2, {"fake_score": "per_step"}),
    "full-4step": (4, {"fake_score": "per_step"}),
    "shared-2step": (2, {"fake_score": "shared"}),
    "shared-4step": (4, {"fake_score": "shared"}),
    "no_ttur": (1, {"ttur": 1}),
    "no_gan": (1, {"gan": False}),
    "dmd_v1": (1, {"ttur": 1, "gan": False, "regression": True}),
    # the fake score's noise levels (issue 13): the DMD2 EDM code's uniform index over 1,000 Karras sigmas with EDM's
    # weight, against the default (the teacher's training draw and loss), at 1 step and with the per-step fake score
    "fake_t_uniform": (1, {"fake_t_distribution": "uniform_index"}),
    "fake_t_uniform-4step": (4, {"fake_t_distribution": "uniform_index"}),
}


def step_students(student):
    """The k-step student's first i steps as students of their own (i = 1..k): their output is step i's."""
    from fewstep.student import Student

    return [Student(student.generator, student.timesteps[: i + 1], info=student.info) for i in range(student.steps)]


def pooled_metrics(student, data: str, n: int, seed: int) -> dict:
    """The metrics of all k steps' outputs pooled: ``n // k`` samples of each step's output (same seed), ``n`` in all,
    so the row compares with the per-step ones (the mixture a shared fake score matches)."""
    import torch

    from fewstep.eval.evaluate import evaluate_against

    k, m = student.steps, n // student.steps
    labels = torch.arange(m) % student.num_classes if student.num_classes > 0 else None
    x = torch.cat([s.sample(m, labels=labels, seed=seed) for s in step_students(student)])
    shape = student.sample_shape
    return {**evaluate_against(x, data, None if labels is None else labels.repeat(k),
                               resolution=shape[-1] if len(shape) == 3 else None), "nfe": None}


def per_step_rows(student, row: dict, data: str, n: int, seed: int) -> list[dict]:
    """One seed's rows for each step of a k-step student (``<variant>@step<i>``; nfe: the i steps its step-i output
    took) and for all steps pooled (``<variant>@pooled``); none for a 1-step student."""
    from fewstep.api import evaluate

    if student.steps == 1:
        return []
    common = {k: row[k] for k in ("data", "method", "steps", "iterations")}
    return ([{**evaluate(s, n=n, seed=seed), **common, "variant": f"{row['variant']}@step{i + 1}",
              "wall_seconds": None} for i, s in enumerate(step_students(student))]
            + [{**pooled_metrics(student, data, n, seed), **common, "variant": f"{row['variant']}@pooled",
                "wall_seconds": None}])


def main() -> None:
    method_benchmark("dmd2", VARIANTS, __doc__, extra_rows=per_step_rows)


if __name__ == "__main__":
    run_main(main)
