"""Every bad input of benchmarks/fault_cases.py, each as its own `fewstep` process: exit 2, one line naming the
problem, and nothing written anywhere but the case's scratch folder."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fault_cases  # noqa: E402


def test_the_table_is_large_and_its_names_unique() -> None:
    names = [c.name for c in fault_cases.CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


def test_every_bad_input_is_one_clean_line() -> None:
    outcomes = fault_cases.run_all(workers=2)
    failures = {o.case.name: (o.problems, o.stderr.strip()[-400:]) for o in outcomes if not o.ok}
    assert not failures, "\n".join(f"{name}: {'; '.join(p)}\n    {err}" for name, (p, err) in failures.items())
