"""Print the README's benchmark tables from benchmarks/results/*.json, or from a `fewstep bench` result.

    python benchmarks/tables.py teacher_nfe
    python benchmarks/tables.py dmd2     # or add, lightning, dmd2_fake_t, shapes
    python benchmarks/tables.py add_sweep   # ADD's lambda sweep and its ablation (benchmarks/add.py sweep)
    python benchmarks/tables.py DIR/bench.json   # the same as `fewstep bench --tables DIR/bench.json`
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, method_columns, run_main  # noqa: E402

from fewstep.bench import print_tables  # noqa: E402
from fewstep.bench.results import teacher_pivot as teacher_nfe  # noqa: E402  (one pivot per data set)


def methods(rows: list[dict]) -> str:
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        out.append(f"**{data}**\n\n" + markdown_table(sub, method_columns(sub)))
    return "\n\n".join(out)


def add_sweep(result: dict) -> str:
    """The lambda sweep's rows per data set (lambda, the ratio aimed at and the one logged, the quality) and the
    ablation's margins."""
    out = []
    ablation = result["meta"].get("ablation", {})
    for data in dict.fromkeys(r["data"] for r in result["rows"]):
        # lambda is a setting, the same in every seed: no "± 0"
        sub = [{k: v for k, v in r.items() if k != "distill_weight_std"} for r in result["rows"] if r["data"] == data]
        quality = ["fid", "fid_heldout"] if data == "digits" else ["sliced_w", "modes_covered"]
        cols = ["variant", "distill_reduction", "distill_weight", "target_ratio", "grad_ratio", "grad_cos",
                *quality, "wall_seconds"]
        out.append(f"**{data}**\n\n" + markdown_table(sub, [c for c in cols if any(c in r for r in sub)]))
        if data in ablation:
            a = ablation[data]
            lines = [f"- full ({a['full']}, logged ratio {a['full_grad_ratio']:.3g}) against {other}: margin "
                     f"{a[key]['margin']:.3g}, {a[key]['margin_in_std']:.2f} std of the difference"
                     if a[key]["margin_in_std"] is not None else f"- full against {other}: margin {a[key]['margin']:.3g}"
                     for other, key in (("adversarial only", "vs_adv_only"), ("distillation only", "vs_distill_only"))]
            out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "teacher_nfe"
    if name.endswith(".json") or Path(name).is_dir():  # a `fewstep bench` result
        print(print_tables(name))
        return
    result = json.loads((RESULTS / f"{name}.json").read_text())
    if name.startswith("add_sweep"):
        print(add_sweep(result))
        return
    print((teacher_nfe if name == "teacher_nfe" else methods)(result["rows"]))


if __name__ == "__main__":
    run_main(main)
