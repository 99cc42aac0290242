"""ADD against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher).

    python benchmarks/add.py                       # digits and grid25, seed 0
    python benchmarks/add.py --data grid25 --seeds 0 1 2

Rows: the teacher at its best NFE and at 1, 2 and 4 NFE (DDIM), as in benchmarks/dmd2.py; ADD 1-step and 4-step
("full"; the 4-step row is a separate 4-step run so that it reads like DMD2's); the 1-step ablations adversarial only
(``distill_weight: 0``) and distillation only (``adversarial: false``); full and adversarial only again with the
teacher's encoder as the feature network (``*_teacher_features``; on digits the default is the classifier FID
reads). Each distillation run uses the shipped config for its data (configs/add_<data>.yaml), so the budget is the
same for every variant. Writes
benchmarks/results/add.json and prints the README table.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import method_benchmark  # noqa: E402

VARIANTS = {  # name: (steps, config overrides)
    "full": (1, {}),
    "full-4step": (4, {}),
    "adv_only": (1, {"distill_weight": 0.0}),
    "distill_only": (1, {"adversarial": False}),
    # the digits default feature network is the digits classifier, the network digits FID reads: these two repeat
    # full / adv_only with the teacher's own encoder as the feature network instead
    "full_teacher_features": (1, {"feature_network": "teacher"}),
    "adv_only_teacher_features": (1, {"feature_network": "teacher", "distill_weight": 0.0}),
}


if __name__ == "__main__":
    method_benchmark("add", VARIANTS, __doc__)
