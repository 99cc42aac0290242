"""Print the README's benchmark tables from benchmarks/results/*.json.

    python benchmarks/tables.py teacher_nfe
    python benchmarks/tables.py dmd2     # or add, lightning
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, fmt, markdown_table, method_columns  # noqa: E402


def teacher_nfe(rows: list[dict]) -> str:
    """One pivot per data set: sampler x NFE, the headline metric in each cell."""
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        metric = "fid" if sub[0].get("fid") is not None else "sliced_w"
        # columns: the NFE budget; Heun's 2n - 1 evaluations sit under the budget 2n they fit, marked with the NFE
        budgets = sorted({r["nfe"] for r in sub if r["variant"] != "heun"})
        lines = [f"**{data}** ({'FID' if metric == 'fid' else 'sliced W'}; lower is better)", "",
                 "| sampler | " + " | ".join(f"NFE {n}" for n in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for sampler in dict.fromkeys(r["variant"] for r in sub):
            cells = {}
            for r in (r for r in sub if r["variant"] == sampler):
                if sampler == "heun":
                    cells[min(b for b in budgets if b >= r["nfe"])] = f"{fmt(r[metric])} ({r['nfe']})"
                else:
                    cells[r["nfe"]] = fmt(r[metric])
            lines.append(f"| {sampler} | " + " | ".join(cells.get(n, "") for n in budgets) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def methods(rows: list[dict]) -> str:
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        out.append(f"**{data}**\n\n" + markdown_table(sub, method_columns(sub)))
    return "\n\n".join(out)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "teacher_nfe"
    result = json.loads((RESULTS / f"{name}.json").read_text())
    print((teacher_nfe if name == "teacher_nfe" else methods)(result["rows"]))


if __name__ == "__main__":
    main()
