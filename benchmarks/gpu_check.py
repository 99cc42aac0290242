"""The GPU check (issue 12): the CUDA paths the CPU test suite cannot reach, in a few minutes, with nothing downloaded.

    bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU (at most 8 minutes)
    bash benchmarks/gpu_check.sh --cpu      # the dry run: the same checks on the CPU, small (what the test runs)

Checks, each one row of the table printed at the end (a failure is a row, and the next check still runs):

* ``sample``: the embedded digits teacher on the device in float32, bf16 and fp16 (weights in that dtype, sampling
  under autocast, as a run's frozen teacher), through ``fewstep.generate`` as a user calls it; FID of each
  against the train split beside float32's (the low precisions should not move it by more than the metric's noise).
* ``train``: a few DMD2 iterations on digits under Accelerate mixed precision no / bf16 / fp16; finite losses, and
  ``max_memory_gb`` from metrics.jsonl; the float32 run ends with its report, as every run does (the teacher sampled
  on the device through ``fewstep.evaluate``).
* ``sdxl-lora``: DMD2 with ``configs/sdxl_dmd2.yaml`` as written (a LoRA generator, gradient checkpointing, bf16)
  on the tiny SDXL-like pipeline the tests build (tests/hf_tiny.py), logging ``max_memory_gb``.
* ``ddp``: ``accelerate launch --num_processes 2`` of a short DMD2 run when more than one GPU is visible.

Without a CUDA device (and without ``--cpu``) it exits 2 with one line. Exit status 1 when any check failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
#: the checks' own budget (the shell script stops everything at 8 minutes): a check not started by then is skipped
BUDGET_S = 420
#: sizes of the GPU run and of the CPU dry run
SIZES = {"gpu": {"n": 2000, "sample_steps": 8, "iterations": 20, "report_n": 500, "sdxl_iterations": 4,
                 "ddp_iterations": 10},
         "cpu": {"n": 32, "sample_steps": 2, "iterations": 2, "report_n": 32, "sdxl_iterations": 2,
                 "ddp_iterations": 2}}
PRECISIONS = ("float32", "bf16", "fp16")


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _finite(rows: list[dict[str, Any]]) -> bool:
    return all(math.isfinite(v) for r in rows for k, v in r.items() if k.endswith("/loss") and v is not None)


def check_sample(device: str, precision: str, n: int, steps: int, reference: dict[str, float]) -> dict[str, Any]:
    import torch

    from fewstep.api import generate, load_teacher
    from fewstep.eval.evaluate import evaluate_against

    dtype = _dtype(precision)
    teacher = load_teacher("digits").to(device=device, dtype=dtype)
    note = ""
    with torch.autocast(device_type=device, dtype=dtype, enabled=precision != "float32"):
        try:
            x, labels, timing = generate(teacher, n, steps=steps, sampler="ddim", seed=0)
        except Exception as e:  # noqa: BLE001 -- the public path failed: say how, and sample directly to go on
            from fewstep.diffusion.samplers import sample

            note = f"fewstep.generate failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); sampled directly. "
            gen = torch.Generator().manual_seed(0)
            z = torch.randn((n, *teacher.sample_shape), generator=gen).to(device)
            labels = torch.arange(n) % teacher.num_classes
            start = time.perf_counter()
            x = sample(teacher, z, steps, "ddim", cond=labels.to(device))
            timing = {"seconds_per_1000": (time.perf_counter() - start) / n * 1000}
    x = x.float().cpu()
    assert torch.isfinite(x).all(), "non-finite samples"
    metrics = evaluate_against(x, "digits", labels=labels.cpu() if labels is not None else None)
    if precision == "float32":
        reference["fid"] = metrics["fid"]
    ratio = metrics["fid"] / reference["fid"] if reference.get("fid") else None
    detail = (f"{note}DDIM {steps} steps, {n} samples: FID {metrics['fid']:.3f}"
              + (f" ({ratio:.2f}x float32's)" if ratio is not None and precision != "float32" else "")
              + f", class accuracy {metrics['class_accuracy']:.3f}, {timing['seconds_per_1000']:.3g} s per 1000")
    return {"detail": detail, "failed": bool(note)}


def _max_memory(rows: list[dict[str, Any]]) -> float | None:
    values = [r["max_memory_gb"] for r in rows if r.get("max_memory_gb") is not None]
    return max(values) if values else None


def check_train(device: str, precision: str, iterations: int, work: Path, report_n: int = 0) -> dict[str, Any]:
    """``report_n`` > 0: the run ends with its report (the student and the teacher's NFE curve sampled on the
    device, as every `fewstep distill` run does)."""
    import warnings

    from fewstep import report as run_report
    from fewstep.distillation import distill
    from fewstep.train.loop import read_metrics

    out = work / f"train_{precision}"
    curve = run_report.TEACHER_CURVE
    if device == "cpu":  # the dry run: the report's teacher rows are the table's two, not the whole curve
        run_report.TEACHER_CURVE = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            student = distill("digits", "dmd2", steps=1, out=out, config=ROOT / "configs" / "dmd2_digits.yaml",
                              iterations=iterations, log_every=1, sample_every=0, checkpoint_every=iterations,
                              progress=False, evaluate_n=report_n,
                              mixed_precision={"float32": "no"}.get(precision, precision))
        finally:
            run_report.TEACHER_CURVE = curve
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == iterations and _finite(rows), f"losses not finite: {rows[-1]}"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in student.parameters()})
    said = sorted({str(w.message).splitlines()[0][:80] for w in caught if "precision" in str(w.message)})
    report = ""
    if report_n:
        student_row = json.loads((out / "eval.json").read_text())[0]
        report = f"; report.html and eval.json written (student FID {student_row['fid']:.3g} at {report_n} samples)"
    return {"max_memory_gb": _max_memory(rows),
            "detail": f"DMD2 digits, {iterations} iterations, finite losses; student weights {'/'.join(dtypes)}"
                      + report + (f"; warned: {said[0]}" if said else "")}


def check_sdxl(device: str, iterations: int, work: Path) -> dict[str, Any]:
    import warnings

    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    import hf_tiny

    from fewstep.distillation import distill
    from fewstep.train.loop import read_metrics

    hf_tiny.sdxl_pipeline(work / "sdxl")
    images = hf_tiny.captioned_images(work / "images", 6)
    cfg = yaml.safe_load((ROOT / "configs" / "sdxl_dmd2.yaml").read_text())
    cfg.update(teacher=str(work / "sdxl"), data=str(images))
    cfg["loop"].update(iterations=iterations, batch_size=2, checkpoint_every=iterations, sample_every=0, log_every=1,
                       progress=False)
    out = work / "sdxl_run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distill(method="dmd2", config=cfg, out=out, evaluate_n=0)
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == iterations and _finite(rows), f"losses not finite: {rows[-1]}"
    loop = cfg["loop"]
    return {"max_memory_gb": _max_memory(rows),
            "detail": f"configs/sdxl_dmd2.yaml (lora_rank {cfg['lora_rank']} on {','.join(cfg['lora_players'])}, "
                      f"gradient_checkpointing {loop['gradient_checkpointing']}, {loop['mixed_precision']}), "
                      f"{iterations} iterations at batch 2, finite losses"}


def ddp_command(out: Path, iterations: int, processes: int = 2) -> list[str]:
    """The 2-process launch, the command a GPU user runs (configs/accelerate_ddp.yaml)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate_ddp.yaml"), "--num_processes", str(processes), "--main_process_port",
            str(29500 + os.getpid() % 2000), "-m", "fewstep.cli", "distill", "--method", "dmd2", "--teacher", "grid25",
            "--steps", "1", "--iterations", str(iterations), "--batch-size", "64", "--out", str(out)]


def check_ddp(device: str, iterations: int, work: Path, gpus: int) -> dict[str, Any]:
    from fewstep.train.loop import read_metrics

    if gpus < 2 and device == "cuda":
        return {"status": "skipped", "detail": f"{gpus} GPU visible; a 2-process launch needs two"}
    if device == "cpu" and not os.environ.get("FEWSTEP_GPU_CHECK_DDP"):
        return {"status": "skipped", "detail": "dry run (set FEWSTEP_GPU_CHECK_DDP=1 to launch 2 CPU processes)"}
    out = work / "ddp_run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run(ddp_command(out, iterations), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0, f"launch exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1]}"
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and _finite(rows), "no finite losses logged"
    return {"max_memory_gb": _max_memory(rows),
            "detail": f"2 processes, DMD2 grid25, {iterations} iterations, report written: "
                      f"{(out / 'report.html').is_file()}"}


def run_checks(device: str, sizes: dict[str, int], work: Path, gpus: int,
               only: set[str] | None = None) -> list[dict[str, Any]]:
    """Every check as a row: ``check``, ``setting``, ``status`` (ok / FAIL / skipped), ``seconds``,
    ``max_memory_gb``, ``detail``."""
    reference: dict[str, float] = {}
    plan: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    for p in PRECISIONS:
        plan.append(("sample", p, lambda p=p: check_sample(device, p, sizes["n"], sizes["sample_steps"], reference)))
    for p in PRECISIONS:
        plan.append(("train", p, lambda p=p: check_train(device, p, sizes["iterations"], work,
                                                         sizes["report_n"] if p == "float32" else 0)))
    plan.append(("sdxl-lora", "bf16", lambda: check_sdxl(device, sizes["sdxl_iterations"], work)))
    plan.append(("ddp", "float32", lambda: check_ddp(device, sizes["ddp_iterations"], work, gpus)))
    rows, start = [], time.monotonic()
    for name, setting, fn in plan:
        if only and name not in only:
            continue
        row = {"check": name, "setting": setting, "status": "ok", "seconds": None, "max_memory_gb": None,
               "detail": ""}
        if time.monotonic() - start > BUDGET_S:
            rows.append({**row, "status": "skipped", "detail": f"not started: {BUDGET_S} s of checks spent"})
            continue
        t0 = time.monotonic()
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        try:
            result = fn()
            failed = result.pop("failed", False)
            row.update(result)
            if failed:
                row["status"] = "FAIL"
        except Exception as e:  # noqa: BLE001 -- a failed check is a row; the others still run
            last = traceback.extract_tb(e.__traceback__)[-1]
            first = (str(e).strip().splitlines() or [""])[0][:200]
            row.update(status="FAIL", detail=f"{type(e).__name__}: {first} ({Path(last.filename).name}:{last.lineno})")
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"{name:>9} {setting:>7}: {row['status']} ({row['seconds']} s) {row['detail']}", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["check", "setting", "status", "seconds", "max_memory_gb", "detail"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the dry run: every check on the CPU, small")
    p.add_argument("--only", default=None, help="comma-separated checks (sample,train,sdxl-lora,ddp)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args(argv)
    if a.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: nothing reaches a GPU
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}): run it on a machine with an NVIDIA GPU, or pass --cpu for the dry run",
              file=sys.stderr)
        return 2
    device = "cpu" if a.cpu else "cuda"
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    what = (f"{gpus} x {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if device == "cuda"
            else f"CPU dry run, {os.cpu_count()} cores")
    only = set(a.only.split(",")) if a.only else None
    with tempfile.TemporaryDirectory(prefix="fewstep-gpu-check-") as tmp:
        work = Path(tmp)
        os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # the latent and evaluation caches: this run's own
        rows = run_checks(device, SIZES["gpu" if device == "cuda" else "cpu"], work, gpus, only)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nfewstep GPU check, {when}: {what}, torch {torch.__version__}\n\n{table(rows)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": when, "machine": what, "torch": torch.__version__,
                                            "rows": rows}, indent=1))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
