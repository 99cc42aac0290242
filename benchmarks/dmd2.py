"""DMD2 against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/dmd2.py                       # digits and grid25, seed 0
    python benchmarks/dmd2.py --data grid25 --seeds 0 1 2

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM); DMD2 1-step and 4-step ("full"); 1-step ablations
without TTUR (ttur 1), without the GAN head, and DMD (v1: no TTUR, no GAN, L2 regression to teacher ODE pairs).
Each distillation run uses the shipped config for its data (configs/dmd2_<data>.yaml), so the budget is the same for
every variant. Writes benchmarks/results/dmd2.json and prints the README table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import method_benchmark  # noqa: E402

VARIANTS = {  # name: (steps, config overrides)
    "full": (1, {}),
    "full-4step": (4, {}),
    "no_ttur": (1, {"ttur": 1}),
    "no_gan": (1, {"gan": False}),
    "dmd_v1": (1, {"ttur": 1, "gan": False, "regression": True}),
}


if __name__ == "__main__":
    method_benchmark("dmd2", VARIANTS, __doc__)
