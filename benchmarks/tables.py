"""Print the README's benchmark tables from benchmarks/results/*.json, or from a `fewstep bench` result.

    python benchmarks/tables.py teacher_nfe
    python benchmarks/tables.py dmd2     # or add, lightning, dmd2_fake_t, shapes
    python benchmarks/tables.py DIR/bench.json   # the same as `fewstep bench --tables DIR/bench.json`
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, method_columns  # noqa: E402

from fewstep.bench import print_tables  # noqa: E402
from fewstep.bench.results import teacher_pivot as teacher_nfe  # noqa: E402  (one pivot per data set)


def methods(rows: list[dict]) -> str:
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        out.append(f"**{data}**\n\n" + markdown_table(sub, method_columns(sub)))
    return "\n\n".join(out)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "teacher_nfe"
    if name.endswith(".json") or Path(name).is_dir():  # a `fewstep bench` result
        print(print_tables(name))
        return
    result = json.loads((RESULTS / f"{name}.json").read_text())
    print((teacher_nfe if name == "teacher_nfe" else methods)(result["rows"]))


if __name__ == "__main__":
    main()
