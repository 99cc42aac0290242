"""Every method on the embedded text-to-image teacher (``shapes``), against the teacher at several CFG scales.

    python benchmarks/shapes.py                                   # the teacher rows, then every variant, seed 0
    python benchmarks/shapes.py --variants dmd2 dmd2-cfg2         # some variants (rows add up in results/shapes.json)
    python benchmarks/shapes.py --variants teacher --n 128        # the teacher rows only
    python benchmarks/shapes.py --variants dmd2 --iterations 20 --n 64   # a smoke run

Every model samples 4 images for each of the 128 prompts (``configs/prompts/shapes_heldout.txt``: the 32 prompts of
the four compositions held out of training, then ``shapes_seen.txt``'s 96), the same noise for each. Measured by
:func:`fewstep.eval.adherence.evaluate_shapes` (the shipped attribute classifier): ``adherence`` (all named attributes
right), ``adherence_seen`` / ``adherence_heldout``, and FID / precision / recall on the classifier's features against
real drawings for the same prompts. Rows: real drawings (FID's floor at this sample count), the teacher (DDIM 1 and 4,
Heun 8) at CFG 1, 2 and 3 and at Heun 16 and 32 unguided, then each student: DMD2 (CFG 1 and 2 on the real score) at 1 and 4 steps, ADD at 1 and 4,
SDXL-Lightning (one ladder run gives its 4-step and 1-step students), DisBack (+ DMD2) at 1 and 4, each with its
shipped config ``configs/<method>_shapes.yaml``. Writes ``benchmarks/results/shapes.json`` and prints the table
(``python benchmarks/tables.py shapes`` prints it again from the file).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, average, markdown_table, meta, method_columns, write_results, run_main  # noqa: E402

# name: (method, variant, steps, config overrides)
VARIANTS = {
    "dmd2": ("dmd2", "cfg1", 1, {}),
    "dmd2-cfg2": ("dmd2", "cfg2", 1, {"guidance_scale": 2.0}),
    "dmd2-4step": ("dmd2", "cfg1", 4, {}),
    "dmd2-cfg2-4step": ("dmd2", "cfg2", 4, {"guidance_scale": 2.0}),
    "add": ("add", "full", 1, {}),
    "add-4step": ("add", "full", 4, {}),
    "lightning": ("lightning", "full", 1, {}),  # its ladder's 4-step and 1-step students
    "disback": ("disback", "dmd2", 1, {}),
    "disback-4step": ("disback", "dmd2", 4, {}),
}
TEACHER = ([(sampler, steps, cfg) for sampler, steps in (("ddim", 1), ("ddim", 4), ("heun", 8)) for cfg in (1.0, 2.0, 3.0)]
           + [("heun", 16, 1.0), ("heun", 32, 1.0)])  # more Heun steps unguided: the teacher's best FID
LIGHTNING_STEPS = (4, 1)

def prompts() -> list[str]:
    from fewstep.data.shapes import evaluation_prompts

    return evaluation_prompts()


def measure(model, n: int, seed: int, **sampling) -> dict:
    from fewstep.api import evaluate

    return evaluate(model, n=n, prompts=prompts(), seed=seed, **sampling)


def real_row(n: int, seeds: list[int]) -> dict:
    """Real drawings for the same prompts (another seed than the reference's): the metric's floor at ``n``."""
    from fewstep.eval.adherence import REFERENCE_SEED, evaluate_shapes, prompt_attributes, reference_images

    p = [prompts()[i % len(prompts())] for i in range(n)]
    return average([{"data": "shapes", "method": "real", "variant": "drawings", "steps": None, "nfe": None,
                     **evaluate_shapes(reference_images(prompt_attributes(p), n, seed=REFERENCE_SEED + 1000 + s), p),
                     "iterations": None, "wall_seconds": None, "seeds": len(seeds)} for s in seeds])


def teacher_rows(n: int, seeds: list[int]) -> list[dict]:
    from fewstep.api import load_teacher

    teacher, rows = load_teacher("shapes"), []
    for sampler, steps, cfg in TEACHER:
        rows.append(average([{"data": "shapes", "method": "teacher", "variant": f"{sampler} cfg{cfg:g}",
                              "steps": steps, **measure(teacher, n, s, steps=steps, sampler=sampler, cfg_scale=cfg),
                              "iterations": None, "wall_seconds": None, "seeds": len(seeds)} for s in seeds]))
        print(line(rows[-1]), flush=True)
    return rows


def student_rows(name: str, n: int, seeds: list[int], work: Path, iterations: int | None) -> list[dict]:
    from fewstep.distillation import distill
    from fewstep.methods.lightning import load_student

    from fewstep.api import load_model

    method, variant, steps, overrides = VARIANTS[name]
    per_steps: dict[int, list[dict]] = {}
    for seed in seeds:
        out = work / f"{name}-{seed}"
        if (out / "student.safetensors").is_file() and iterations is None:  # a finished run kept by --keep
            student, wall = load_model(out), kept_wall_seconds(out)
        else:
            start = time.perf_counter()
            student = distill("shapes", method, steps=steps, out=out, seed=seed, iterations=iterations,
                              config=ROOT / "configs" / f"{method}_shapes.yaml", progress=False, evaluate_n=0,
                              **overrides)
            wall = time.perf_counter() - start
            (out / "wall_seconds.txt").write_text(f"{wall}\n")
        students = ({k: load_student(out / "students" / f"steps_{k}") for k in LIGHTNING_STEPS}
                    if method == "lightning" else {steps: student})
        for k, s in students.items():
            per_steps.setdefault(k, []).append(
                {"data": "shapes", "method": method, "variant": variant, "steps": k, **measure(s, n, seed),
                 "iterations": student.info["meta"]["iterations"], "wall_seconds": wall})
    rows = [{**average(per_steps[k]), "seeds": len(seeds)} for k in sorted(per_steps, reverse=True)]
    for r in rows:
        print(line(r), flush=True)
    return rows


def kept_wall_seconds(out: Path) -> float:
    """The distillation wall time of a kept run: recorded beside it, else its training log's last elapsed time."""
    import json

    if (out / "wall_seconds.txt").is_file():
        return float((out / "wall_seconds.txt").read_text())
    return float(json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["seconds"])


def ordered(rows: list[dict]) -> list[dict]:
    """Real drawings, the teacher, then the students in VARIANTS' order, more steps first within a variant."""
    names = [(m, v) for m, v, _, _ in VARIANTS.values()]
    rank = {"real": -2, "teacher": -1}

    def key(r: dict) -> tuple:
        if r["method"] in rank:
            return (rank[r["method"]], 0, 0)
        pair = (r["method"], r["variant"])
        return (names.index(pair) if pair in names else len(names), 0, -(r["steps"] or 0))

    return sorted(rows, key=key)


def line(r: dict) -> str:
    def f(key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.3f}"

    return (f"{r['method']:>9} {r['variant']:>10} steps {r['steps'] or '-':>2} nfe {r['nfe'] or '-':>3}  adherence "
            f"{f('adherence')} (seen {f('adherence_seen')}, held-out {f('adherence_heldout')})  fid {r['fid']:.4g}")


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["teacher", *VARIANTS], choices=["teacher", *VARIANTS])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n", type=int, default=512, help="samples per model (4 per prompt at 512)")
    p.add_argument("--iterations", type=int, default=None, help="override the configs' iterations (smoke runs)")
    p.add_argument("--keep", default=None, help="keep the run directories in this folder; a finished run found there "
                                                "is measured again, not trained again (more seeds add up)")
    a = p.parse_args()

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if "teacher" in a.variants:
            rows.append(real_row(a.n, a.seeds))
            print(line(rows[-1]), flush=True)
            rows.extend(teacher_rows(a.n, a.seeds))
        for name in a.variants:
            if name != "teacher":
                rows.extend(student_rows(name, a.n, a.seeds, work, a.iterations))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = write_results("shapes", meta(a.seeds, n=a.n), rows)
    print("\n" + markdown_table(ordered(rows), method_columns(rows)))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    run_main(main)
