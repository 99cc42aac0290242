"""Faults a user meets, counted: bad inputs that end as one clean line, and kill -9 mid-run followed by --resume.

    python benchmarks/faults.py                 # every case of fault_cases.py, and 5 kills of one training run
    python benchmarks/faults.py --kills 10

Prints the README line and writes benchmarks/results/faults.json (DESIGN.md's result format): one row for the bad
inputs (tried, clean, the names of any that were not) and one for the kills (kills survived, resumes compared bit
for bit with the uninterrupted run, files lost: must be 0).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fault_cases  # noqa: E402
from common import meta, write_results, run_main  # noqa: E402
from kill_resume import kill_resume  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="kill -9 moments in one training run")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--workers", type=int, default=2, help="bad-input cases run at once")
    a = p.parse_args()

    start = time.perf_counter()
    outcomes = fault_cases.run_all(workers=a.workers)
    s = fault_cases.summary(outcomes)
    bad_row = {"data": "cli", "method": "faults", "variant": "bad_input", "steps": None, "nfe": None,
               "tried": s["bad_inputs_tried"], "clean": s["bad_inputs_clean"], "not_clean": sorted(s["failures"]),
               "iterations": None, "wall_seconds": round(time.perf_counter() - start, 1)}
    for name, problems in s["failures"].items():
        print(f"not clean: {name}: {'; '.join(problems)}", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fewstep-kills-") as tmp:
        k = kill_resume(a.kills, a.seed, Path(tmp))
    kill_row = {"data": "cli", "method": "faults", "variant": "kill_resume", "steps": None, "nfe": None, **k,
                "iterations": None, "wall_seconds": round(time.perf_counter() - start, 1)}

    path = write_results("faults", meta([a.seed]), [bad_row, kill_row])
    print(f"Faults (`python benchmarks/faults.py`): {k['kills']} kill -9 moments survived, "
          f"{k['resumes_bit_exact']} of {k['kills']} resumed runs equal to the uninterrupted one bit for bit, "
          f"{s['bad_inputs_clean']} of {s['bad_inputs_tried']} bad inputs one clean line (exit 2, no file "
          f"written), files lost: {k['files_lost']}.")
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
