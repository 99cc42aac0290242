"""kill -9 a `fewstep distill` run at random moments, resume it each time, and compare with an uninterrupted run.

A tiny DMD2 run on the embedded grid25 teacher (a checkpoint every 3 iterations, a metrics row every iteration) is
started as a subprocess and SIGKILLed at ``kills`` seeded random moments: each a random iteration of the run (drawn
without replacement, in order) plus a random fraction of the next one; one of them, drawn too, lands while a
checkpoint is being written (the loop's test hook ``FEWSTEP_SLOW_CHECKPOINT_WRITE`` pauses halfway through the bytes, and the
kill comes once the temporary file appears). After every kill the run is resumed with nothing but
``fewstep distill --out RUN --resume`` (its own config.yaml). Meanwhile the same run goes uninterrupted.

Counted:

* ``resumes_bit_exact`` -- resumes whose every metrics row (losses to the last bit; all fields but ``seconds``)
  equals the uninterrupted run's row of the same iteration;
* ``final_weights_bit_exact`` -- ``student.safetensors`` byte for byte equal to the uninterrupted run's;
* ``files_lost`` -- after each kill: checkpoints under their final name that do not load, a changed config.yaml,
  metrics rows missing up to the newest checkpoint; at the end: results missing.

``python benchmarks/kill_resume.py [--kills 5] [--seed 0]`` prints the result as JSON; ``tests/test_resume.py`` and
``benchmarks/faults.py`` call :func:`kill_resume`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ITERATIONS = 40  # at least; 8 per kill with more kills
CHECKPOINT_EVERY = 3
SLOW_WRITE_SECONDS = 1.0
TIMEOUT = 300.0


def _config(path: Path, iterations: int) -> Path:
    cfg = {"method": "dmd2", "teacher": "grid25", "steps": 1,
           "loop": {"iterations": iterations, "batch_size": 32, "checkpoint_every": CHECKPOINT_EVERY,
                    "keep_checkpoints": 2, "log_every": 1, "sample_every": 0, "progress": False}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for hook in ("FEWSTEP_CRASH_AT_STEP", "FEWSTEP_SLOW_CHECKPOINT_WRITE"):
        if env is None or hook not in env:
            full_env.pop(hook, None)
    return subprocess.Popen([sys.executable, "-m", "fewstep.cli", "distill", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict[str, Any]]:
    from fewstep.train import read_metrics

    return read_metrics(run / "metrics.jsonl")


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"fewstep distill failed (exit {proc.returncode}): {err.strip()[-2000:]}")


def _kill_when(proc: subprocess.Popen, run: Path, step: int, fraction: float, mid_write: bool) -> bool:
    """SIGKILL ``proc`` ``fraction`` of an iteration after the row of iteration ``step`` appears (``mid_write``:
    ``fraction`` of the paused write after a checkpoint's temporary file appears). False when the run finished
    first."""
    deadline = time.monotonic() + TIMEOUT
    while not any(r.get("it", 0) >= step for r in _rows(run)):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"no metrics row {step} in {run}")
        time.sleep(0.01)
    if mid_write:
        while not list((run / "checkpoints").glob(".step_*.tmp")):
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
        time.sleep(fraction * 0.5 * SLOW_WRITE_SECONDS)
    else:
        seconds = [r["seconds"] for r in _rows(run)[-2:] if isinstance(r.get("seconds"), (int, float))]
        time.sleep(fraction * (seconds[1] - seconds[0] if len(seconds) == 2 else 0.05))
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _losses(run: Path) -> int:
    """Files that a kill damaged or lost: checkpoints that do not load, metrics rows missing before the newest."""
    from fewstep.train import list_checkpoints, load_checkpoint

    lost, newest = 0, 0
    for path in list_checkpoints(run):
        try:
            newest = max(newest, int(load_checkpoint(path)["iteration"]))
        except Exception:
            lost += 1
    logged = {r.get("it") for r in _rows(run)}
    return lost + sum(1 for it in range(1, newest + 1) if it not in logged)


def kill_resume(kills: int = 5, seed: int = 0, workdir: str | Path | None = None) -> dict[str, Any]:
    """Kill and resume a tiny ``fewstep distill`` run ``kills`` times; see the module docstring for what is counted.

    Returns ``{"kills", "kills_during_checkpoint_write", "resumes", "resumes_bit_exact", "final_weights_bit_exact",
    "files_lost", "seconds"}``.
    """
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="kill_resume-") if workdir is None else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    iterations = max(ITERATIONS, 8 * kills)
    planned = sorted(rng.sample(range(CHECKPOINT_EVERY + 1, iterations - 12), kills))  # after the first checkpoint
    mid_write = rng.randrange(kills) if kills else -1
    config = _config(workdir / "kill_resume.yaml", iterations)
    run, clean = workdir / "killed", workdir / "clean"

    reference = _start(["--config", str(config), "--out", str(clean)])
    slow = {"FEWSTEP_SLOW_CHECKPOINT_WRITE": str(SLOW_WRITE_SECONDS)}
    proc = _start(["--config", str(config), "--out", str(run)], env=slow if mid_write == 0 else None)
    config_text: bytes | None = None
    done_kills = during_write = files_lost = 0
    start, written = 0, []  # where the running segment started; the rows each segment wrote
    for i, step in enumerate(planned):
        # a row the running process wrote itself (the killed one may have logged a few past its checkpoint)
        target = max([step, *(r["it"] + 1 for r in _rows(run))])
        if target > iterations - 2 or not _kill_when(proc, run, target, rng.random(), i == mid_write):
            break
        done_kills += 1
        during_write += int(i == mid_write and bool(list((run / "checkpoints").glob(".step_*.tmp"))))
        written.append([r for r in _rows(run) if r["it"] > start])
        config_text = config_text or (run / "config.yaml").read_bytes()
        files_lost += _losses(run) + int((run / "config.yaml").read_bytes() != config_text)
        start = _resumed_from(run)
        proc = _start(["--out", str(run), "--resume"], env=slow if i + 1 == mid_write else None)
    _finish(proc)  # the last one runs to the end
    _finish(reference)
    written.append([r for r in _rows(run) if r["it"] > start])

    theirs = {r["it"]: _strip(r) for r in _rows(clean)}
    resumes_exact = sum(int(bool(rows) and all(_strip(r) == theirs.get(r["it"]) for r in rows))
                        for rows in written[1:])  # the first segment is no resume
    files_lost += sum(1 for name in ("student.safetensors", "student.json", "eval.json", "report.html")
                      if not (run / name).is_file())
    final = (run / "student.safetensors").is_file() and (
        (run / "student.safetensors").read_bytes() == (clean / "student.safetensors").read_bytes())
    return {"kills": done_kills, "kills_during_checkpoint_write": during_write, "resumes": len(written) - 1,
            "resumes_bit_exact": resumes_exact, "final_weights_bit_exact": bool(final), "files_lost": files_lost,
            "seconds": round(time.perf_counter() - t0, 1)}


def _resumed_from(run: Path) -> int:
    """The iteration a resume starts from: its newest checkpoint that loads (what the loop will pick)."""
    from fewstep.train import latest_checkpoint

    found = latest_checkpoint(run, warn=False)
    return 0 if found is None else int(found[1]["iteration"])


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "seconds"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a new temporary folder)")
    a = p.parse_args(argv)
    print(json.dumps(kill_resume(a.kills, a.seed, a.workdir)))


if __name__ == "__main__":
    main()
