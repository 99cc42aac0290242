"""Sampling speed: a 1-step student's throughput against its teacher's at the teacher's best-quality NFE (issue 12).

    python benchmarks/sampling_speed.py                            # digits and grid25, students distilled briefly here
    python benchmarks/sampling_speed.py --runs runs/dmd2_digits    # students from run directories (their own data)
    python benchmarks/sampling_speed.py --data digits --repeats 9 --n 1000

Both models sample in the same process, on the same threads (``--threads``, default 1: one core), from the same
noise: one warm-up call each, then ``--repeats`` calls taking turns (teacher, student, teacher, ...), so load from
anything else on the machine falls on both; the median time of each is reported, with the spread of the repeats
(min and max). Throughput is samples per second over one batch of ``--n`` samples (the sampling loop alone, as
``fewstep.generate`` times it); the ratio is the student's over the teacher's. The target is 30x or more.

The teacher's best-quality setting is the sampler and steps with the lowest FID (digits) or sliced Wasserstein
distance (2-D) in benchmarks/results/teacher_nfe.json (3 seeds; Heun 32 steps, NFE 63, on both data sets today),
or ``--teacher-sampler``/``--teacher-steps``. A student distilled here runs ``--iterations`` of DMD2 with the
shipped config: its speed does not depend on how long it trained (its network and step count are the run's), only
its quality would. Writes benchmarks/results/sampling_speed.json (DESIGN.md's result format) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, markdown_table, meta, write_results, run_main  # noqa: E402

import torch  # noqa: E402

#: samples per timed call, per kind of data (one batch: ``fewstep.generate`` samples 1,000 at a time)
DEFAULT_N = {"image": 250, "points": 1000}
TARGET = 30.0


def best_setting(data: str) -> tuple[str, int]:
    """The teacher's (sampler, steps) of lowest FID or sliced W in results/teacher_nfe.json; Heun 32 without it."""
    path = RESULTS / "teacher_nfe.json"
    rows = [r for r in json.loads(path.read_text())["rows"] if r["data"] == data] if path.is_file() else []
    key = "fid" if rows and rows[0].get("fid") is not None else "sliced_w"
    rows = [r for r in rows if r.get(key) is not None]
    if not rows:
        return "heun", 32
    best = min(rows, key=lambda r: r[key])
    return best["variant"], int(best["steps"])


def students(a: argparse.Namespace, work: Path) -> list[tuple[str, object, str, int | None]]:
    """``(data, 1-step student, where it came from, iterations)`` for every data set measured."""
    from fewstep.api import load_model, model_data
    from fewstep.distillation import distill
    from fewstep.errors import UserError

    out = []
    for run in a.runs or []:
        student = load_model(run)
        if getattr(student, "steps", None) != 1:
            raise UserError(f"{run} is not a 1-step student (steps {getattr(student, 'steps', None)}); give the run "
                            "directory of a `fewstep distill --steps 1` run")
        out.append((model_data(student), student, str(run), student.info.get("meta", {}).get("iterations")))
    if a.runs:
        return out
    for data in a.data:
        config = ROOT / "configs" / f"dmd2_{data}.yaml"
        student = distill(data, "dmd2", steps=1, out=work / data, config=config if config.exists() else None,
                          iterations=a.iterations, progress=False, evaluate_n=0, sample_every=0)
        out.append((data, student, f"dmd2, {a.iterations} iterations here", a.iterations))
    return out


def timed(model: object, n: int, seed: int, **kw: object) -> float:
    """Seconds to sample ``n`` (the loop alone, from :func:`fewstep.generate`)."""
    from fewstep.api import generate

    return generate(model, n, seed=seed, **kw)[2]["seconds_per_1000"] * n / 1000


def measure(data: str, student: object, teacher: object, n: int, repeats: int, sampler: str, steps: int,
            seed: int) -> tuple[list[float], list[float]]:
    """Teacher and student seconds per call of ``n`` samples, ``repeats`` each after one warm-up, taking turns."""
    kw = {"steps": steps, "sampler": sampler}
    timed(teacher, n, seed, **kw), timed(student, n, seed)  # warm-up: allocator, kernels' first calls
    t_times, s_times = [], []
    for _ in range(repeats):
        t_times.append(timed(teacher, n, seed, **kw))
        s_times.append(timed(student, n, seed))
    return t_times, s_times


def row(data: str, method: str, variant: str, steps: int, nfe: int, times: list[float], n: int,
        **extra: object) -> dict:
    median = statistics.median(times)
    return {"data": data, "method": method, "variant": variant, "steps": steps, "nfe": nfe, "n": n,
            "repeats": len(times), "seconds_per_1000": median / n * 1000,
            "samples_per_second": n / median, "samples_per_second_min": n / max(times),
            "samples_per_second_max": n / min(times), **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "grid25"])
    p.add_argument("--runs", nargs="+", default=None, help="run directories of 1-step students (instead of --data)")
    p.add_argument("--iterations", type=int, default=20, help="DMD2 iterations of a student distilled here")
    p.add_argument("--n", type=int, default=None, help="samples per timed call (default: 250 images, 1000 points)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: one core)")
    p.add_argument("--teacher-sampler", default=None, help="default: the best of results/teacher_nfe.json")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from fewstep.api import load_teacher
    from fewstep.diffusion.samplers import nfe
    from fewstep.models.hf import image_shape

    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-speed-"))
    try:
        for data, student, source, iterations in students(a, work):
            teacher = load_teacher(student.info["meta"].get("teacher") or data) if a.runs else load_teacher(data)
            sampler, steps = best_setting(data)
            sampler, steps = a.teacher_sampler or sampler, a.teacher_steps or steps
            n = a.n or DEFAULT_N["image" if len(image_shape(teacher)) == 3 else "points"]
            t_times, s_times = measure(data, student, teacher, n, a.repeats, sampler, steps, a.seed)
            t = row(data, "teacher", sampler, steps, nfe(sampler, steps), t_times, n, iterations=None,
                    wall_seconds=None)
            s = row(data, student.info["meta"].get("method", "dmd2"), "full", 1, 1, s_times, n,
                    iterations=iterations, wall_seconds=None, source=source)
            s["speedup"] = s["samples_per_second"] / t["samples_per_second"]
            # the ratio of each turn's pair, so a slow moment on the machine shows as spread, not as a ratio
            pairs = sorted(tt / st for tt, st in zip(t_times, s_times))
            s["speedup_min"], s["speedup_max"] = pairs[0], pairs[-1]
            rows += [t, s]
            print(f"{data:>8}: teacher {sampler} {steps} (NFE {t['nfe']}) {t['samples_per_second']:.4g}/s, "
                  f"1-step student {s['samples_per_second']:.4g}/s: {s['speedup']:.1f}x "
                  f"(turns {pairs[0]:.1f}-{pairs[-1]:.1f}x)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = write_results("sampling_speed", meta([a.seed], threads=a.threads, repeats=a.repeats, target=TARGET), rows)
    for r in rows:
        lo, mid, hi = (f"{r[f'samples_per_second{k}']:,.0f}" for k in ("_min", "", "_max"))
        r["samples/s"] = f"{mid} ({lo}-{hi})"
        if "speedup" in r:
            r["student / teacher"] = f"{r['speedup']:.1f}x ({r['speedup_min']:.1f}-{r['speedup_max']:.1f})"
    print("\n" + markdown_table(rows, ["data", "method", "variant", "steps", "nfe", "n", "samples/s",
                                       "student / teacher"]))
    missed = [r["data"] for r in rows if r.get("speedup", TARGET) < TARGET]
    print(f"\ntarget {TARGET:g}x: " + (f"missed on {', '.join(missed)}" if missed else "met on every data set"))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
