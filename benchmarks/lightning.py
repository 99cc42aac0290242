"""SDXL-Lightning against its teacher and its ablations, on digits and the 25-Gaussian grid (fixed seeds, same teacher
as benchmarks/dmd2.py).

    python benchmarks/lightning.py                       # digits and grid25, seed 0
    python benchmarks/lightning.py --data digits --variants full

One run per variant walks the whole ladder (32 teacher steps -> 8 by MSE -> 4 -> 2 -> 1) and leaves a student for every
rung, so each variant gives rows for 8, 4, 2 and 1 steps. Variants: ``full`` (the paper: per adversarial stage a LoRA
with the conditional objective, then the unconditional one, merged, then the full network unconditional),
``conditional`` (the conditional objective only), ``mse_only`` (progressive MSE distillation all the way down) and
``paper_stabilisers`` (``full`` with the paper's multi-timestep training of 1- and 2-step students and re-noising to
t* in {10, 250, 500, 750}, which the shipped configs scale down).
``full-lora`` rows sample the ``full`` run's LoRA files put on the teacher (rank ``lora_export_rank``). Teacher rows
are those of benchmarks/dmd2.py. Each run uses the shipped config (configs/lightning_<data>.yaml), so every variant
has the same budget. Writes benchmarks/results/lightning.json and prints the README table.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import average, benchmark_parser, markdown_table, meta, teacher_rows, write_results, run_main  # noqa: E402

from fewstep.api import evaluate, load_teacher  # noqa: E402
from fewstep.distillation import distill  # noqa: E402
from fewstep.methods.lightning import LightningStudent, apply_lora, load_student  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"full": {}, "conditional": {"objective": "conditional"}, "mse_only": {"objective": "mse_only"},
            # the paper's stabilisers (the shipped configs scale them down; see configs/lightning_digits.yaml)
            "paper_stabilisers": {"multi_timestep_max_steps": 2, "renoise_fractions": [0.01, 0.25, 0.5, 0.75]}}
STEPS = (8, 4, 2, 1)


def main() -> None:
    p = benchmark_parser(__doc__, VARIANTS)
    p.add_argument("--keep", default=None, help="keep the run directories in this folder")
    a = p.parse_args()

    rows = []
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for data in a.data:
            teacher = load_teacher(data)
            rows.extend(teacher_rows(data, a.seeds, a.n, _line))
            config = ROOT / "configs" / f"lightning_{data}.yaml"
            for variant in a.variants:
                per_seed: dict[str, list[dict]] = {}
                for seed in a.seeds:
                    out = work / f"{data}-{variant}-{seed}"
                    start = time.perf_counter()
                    final = distill(data, "lightning", steps=1, out=out, config=config, seed=seed,
                                    iterations=a.iterations, progress=False, evaluate_n=0, **VARIANTS[variant])
                    wall = time.perf_counter() - start
                    iterations = final.info["meta"]["iterations"]
                    for k in STEPS:
                        student = load_student(out / "students" / f"steps_{k}")
                        per_seed.setdefault(f"{variant}/{k}", []).append(
                            {"data": data, "method": "lightning", "variant": variant, "steps": k,
                             **evaluate(student, n=a.n, seed=seed), "iterations": iterations, "wall_seconds": wall})
                        if variant == "full":
                            lora = LightningStudent(apply_lora(teacher, out / "students" / f"lora_steps_{k}"),
                                                    student.timesteps)
                            lora.info = student.info
                            per_seed.setdefault(f"full-lora/{k}", []).append(
                                {"data": data, "method": "lightning", "variant": "full-lora", "steps": k,
                                 **evaluate(lora, n=a.n, seed=seed), "iterations": iterations, "wall_seconds": wall})
                for key in sorted(per_seed, key=lambda s: (s.split("/")[0], -int(s.split("/")[1]))):
                    rows.append(average(per_seed[key]))
                    print(_line(rows[-1]), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results("lightning", meta(a.seeds, n=a.n), rows)  # rows of variants not run now are kept
    for data in a.data:
        sub = [r for r in rows if r["data"] == data]
        cols = (["method", "variant", "steps", "nfe", "fid", "precision", "recall", "class_accuracy", "wall_seconds"]
                if sub[0].get("fid") is not None else
                ["method", "variant", "steps", "nfe", "sliced_w", "modes_covered", "high_quality", "wall_seconds"])
        print(f"\n### {data}\n" + markdown_table(sub, cols))
    print(f"\nwrote {path}")


def _line(r: dict) -> str:
    key = "fid" if r.get("fid") is not None else "sliced_w"
    return (f"{r['data']:>8} {r['method']:>9} {r['variant']:>11} steps {r['steps']:>2} nfe {r['nfe']:>3}  "
            f"{key} {r[key]:.4g}  precision {r.get('precision') or 0:.3g} recall {r.get('recall') or 0:.3g}")


if __name__ == "__main__":
    run_main(main)
