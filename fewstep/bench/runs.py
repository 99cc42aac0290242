"""The runs of ``fewstep bench``: the plan, the cache keys, training (or reuse, or resume) and evaluation."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..io import atomic_write_json, check_writable
from ..options import MAX_STUDENT_STEPS, TEACHERS, whole_number
from .results import average

PACKAGE = Path(__file__).resolve().parents[1]
CONFIGS = PACKAGE.parent / "configs"
#: the teacher's frontier: every sampler at these steps (Heun's NFE is 2 steps - 1)
TEACHER_SAMPLERS = ("ddim", "euler", "heun")
TEACHER_STEPS = (1, 2, 4, 8, 16, 32)
#: the teacher settings beside the students in the sample grids: 1, 4 and 63 NFE
GRID_TEACHER = (("ddim", 1), ("ddim", 4), ("heun", 32))
#: methods whose training does not depend on the student's steps, which only choose the times it samples at: ADD
#: trains the student at its ``student_times`` (999, 749, 499, 249) whatever ``steps`` is. The bench trains one run
#: per seed, at the most steps asked, and samples that network at every step count (tests/test_bench.py checks that
#: ADD's weights are the same at 1 and 4 steps)
SAMPLER_ONLY_STEPS = ("add",)
#: bump when a change of the training code changes what the shipped configs train (it is part of the cache key)
CACHE_VERSION = 1
#: the training code (paths under fewstep/) and the evaluation code whose hashes each record keeps
TRAINING_CODE = ("config.py", "distillation.py", "student.py", "options.py", "diffusion", "models", "methods", "train",
                 "data")
EVALUATION_CODE = ("api.py", "student.py", "diffusion", "models", "data", "eval/evaluate.py", "eval/metrics.py",
                   "eval/classifier.py")
#: the code the step efficiency's measurement runs (its cache entries keep this hash)
PROFILE_CODE = ("bench/profile.py", "train", "methods", "models")
#: an evaluation's result keys a row keeps
METRICS = ("nfe", "fid", "fid_heldout", "precision", "recall", "class_accuracy", "sliced_w", "modes_covered",
           "high_quality", "seconds_per_1000")


@dataclass
class Run:
    """One training run of the plan: ``method`` on ``data``'s teacher at ``steps`` with training seed ``seed``;
    ``students`` are the step counts measured from it (Lightning: the ladder's rungs; ADD: every step count asked,
    :data:`SAMPLER_ONLY_STEPS`; else ``(steps,)``)."""

    data: str
    method: str
    steps: int
    seed: int
    students: tuple[int, ...]
    config: Any  # the resolved pydantic config
    key: str
    folder: Path  # DIR/runs/<key>

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    @property
    def record_path(self) -> Path:
        return self.folder / "record.json"

    @property
    def label(self) -> str:
        return f"{self.data} {self.method} {self.steps}-step seed {self.seed}"

    def finished(self) -> bool:
        return (self.run_dir / "student.json").is_file() and self.record_path.is_file()


@dataclass
class Plan:
    """What ``fewstep bench`` trains and measures, checked before anything runs."""

    out: Path
    data: list[str]
    methods: list[str]
    steps: list[int]
    seeds: list[int]
    n: int
    iterations: int | None
    teacher_settings: list[tuple[str, int]]
    runs: list[Run] = field(default_factory=list)
    profile_steps: int = 20  # profiled iterations per (method, steps) for the step efficiency; 0: none
    profile_warmup: int = 5


def _names(value: str | list[str] | tuple[str, ...], flag: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [s.strip() for s in items if str(s).strip()]
    if not items:
        raise UserError(f"{flag} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))


def _whole(value: Any, flag: str, least: int = 1, most: int | None = None) -> int:
    """:func:`fewstep.options.whole_number` of a number or of the command line's string."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    return whole_number(value, flag, least, most)


def _whole_list(value: str | list[int] | tuple[int, ...], flag: str, most: int | None = None) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [_whole(s, flag, 1, most) for s in items if str(s).strip()]
    if not out:
        raise UserError(f"{flag} is empty; give a comma-separated list of whole numbers")
    return sorted(set(out))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_hash(parts: tuple[str, ...]) -> str:
    """A hash of the source files ``parts`` (paths under fewstep/, folders taken whole)."""
    h = hashlib.sha256()
    for part in parts:
        p = PACKAGE / part
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(PACKAGE).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _weights_hash(data: str) -> str:
    """The teacher of ``data`` and the digits classifier, by the sha256 of their weight files."""
    from .. import zoo

    files = [zoo.require(data).with_suffix(".safetensors"), zoo.require(zoo.CLASSIFIER).with_suffix(".safetensors")]
    return hashlib.sha256("".join(_sha256(f) for f in files).encode()).hexdigest()


def _version() -> str:
    """fewstep's installed version ("source" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fewstep")
    except PackageNotFoundError:
        return "source"


def run_key(config: Any, weights: str) -> str:
    """The cache key of a run: its resolved ``config`` without the fields a resume may change (they decide logging
    and checkpointing, not what is trained), the weights' hash and the code's version."""
    from ..train.loop import SAFE_TO_CHANGE_ON_RESUME

    dump = config.model_dump(mode="json")
    for dotted in SAFE_TO_CHANGE_ON_RESUME:
        *parents, leaf = dotted.split(".")
        d = dump
        for p in parents:
            d = d.get(p) or {}
        d.pop(leaf, None)
    blob = json.dumps({"config": dump, "weights": weights, "version": [_version(), CACHE_VERSION]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _lightning_phases(cfg: Any) -> int:
    """The training phases of a Lightning ladder (each needs one iteration at least)."""
    return sum(len(cfg.phase_kinds(s)) for s in range(len(cfg.stages())))


def make_plan(out: str | Path, data: Any = "digits,grid25", methods: Any = "dmd2,add,lightning,disback",
              steps: Any = "1,2,4", seeds: Any = 3, n: Any = 2000, iterations: Any = None,
              config_dir: str | Path | None = None, teacher_steps: Any = TEACHER_STEPS, profile_steps: Any = 20,
              profile_warmup: Any = 5) -> Plan:
    """Check every option and resolve every run's config (one-line :class:`UserError` before anything trains).

    Args:
        out: the bench folder (new, or one an earlier ``fewstep bench`` wrote: its cache is reused).
        data: embedded data sets (comma-separated or a list); each trains on its embedded teacher.
        methods: distillation methods (comma-separated or a list).
        steps: student step counts.
        seeds: the number of training seeds (0, 1, ..., seeds - 1); evaluation seed = training seed.
        n: evaluation samples per model and seed.
        iterations: override the configs' ``loop.iterations`` (quick runs).
        config_dir: where ``<method>_<data>.yaml`` are (default: the repository's ``configs/``).
        teacher_steps: the teacher's frontier: every sampler of :data:`TEACHER_SAMPLERS` at these steps.
        profile_steps: iterations profiled per (method, steps) for the step efficiency column, after
            ``profile_warmup`` unprofiled ones (0: no profiling, the column stays empty).
    """
    from ..methods import METHOD_NAMES

    out = Path(out)
    datas = _names(data, "--data")
    for d in datas:
        if d not in TEACHERS:
            raise UserError(f"--data {d!r}: the bench distils embedded teachers; choose from {', '.join(TEACHERS)}")
    names = _names(methods, "--methods")
    for m in names:
        if m not in METHOD_NAMES:
            raise UserError(f"unknown method {m!r} in --methods; choose from {', '.join(METHOD_NAMES)}")
    step_list = _whole_list(steps, "--steps", MAX_STUDENT_STEPS)
    n_seeds = _whole(seeds, "--seeds", 1, 1000)
    n = _whole(n, "--n", 10)
    if iterations is not None:
        iterations = _whole(iterations, "--iterations")
    teacher_steps = _whole_list(teacher_steps, "--teacher-steps")
    profile_steps = _whole(profile_steps, "--profile-steps", 0, 10_000)
    profile_warmup = _whole(profile_warmup, "--profile-warmup", 1, 10_000)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.json").is_file():
        raise UserError(f"--out {out} exists and is not a fewstep bench folder (no plan.json); choose a new --out "
                        "(or the folder of an earlier fewstep bench to reuse its runs)")
    check_writable(out)
    from ..distillation import make_config  # torch: after the options are checked

    config_dir = Path(config_dir) if config_dir is not None else CONFIGS
    settings = [(s, k) for s in TEACHER_SAMPLERS for k in teacher_steps]
    plan = Plan(out, datas, names, step_list, list(range(n_seeds)), n, iterations, settings,
                profile_steps=profile_steps, profile_warmup=profile_warmup)
    for d in datas:
        weights = _weights_hash(d)
        for m in names:
            path = config_dir / f"{m}_{d}.yaml"
            if not path.is_file():
                raise UserError(f"no shipped config {path} for {m} on {d}; drop {m} or {d}, or write that config")
            # Lightning: one run down to the fewest steps; every other step count must be one of its rungs. ADD:
            # one run at the most steps, sampled at each (SAMPLER_ONLY_STEPS)
            trained = ([min(step_list)] if m == "lightning" else [max(step_list)] if m in SAMPLER_ONLY_STEPS
                       else step_list)
            for k in step_list:
                cfg = make_config(m, path, steps=k, iterations=iterations)
                if m == "lightning" and (cfg.loop.iterations < _lightning_phases(cfg)):
                    raise UserError(f"--iterations {cfg.loop.iterations} is fewer than the {_lightning_phases(cfg)} "
                                    f"training phases of lightning's ladder to {k} steps; pass --iterations "
                                    f"{_lightning_phases(cfg)} or more")
            for k in trained:
                for seed in plan.seeds:
                    cfg = make_config(m, path, steps=k, seed=seed, iterations=iterations)
                    key = run_key(cfg, weights)
                    students = tuple(step_list) if m == "lightning" or m in SAMPLER_ONLY_STEPS else (k,)
                    plan.runs.append(Run(d, m, k, seed, students, cfg, key, out / "runs" / key))
    return plan


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, Any]]:
    """Measure the peak memory of the ``with`` body into the yielded dict (``gb``, ``kind``): on a GPU the peak
    allocated CUDA memory, else the process's peak resident memory so far (``ru_maxrss``: what the process held
    before the body counts too)."""
    import torch

    out: dict[str, Any] = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield out
        out.update(gb=torch.cuda.max_memory_allocated() / 2**30, kind="cuda allocated")
        return
    import resource
    import sys

    yield out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes
    out.update(gb=peak / 2**30, kind="process resident")


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default


def train_run(run: Run, code: str, progress: bool = False) -> dict[str, Any]:
    """Train ``run`` (or reuse it, or resume it from its newest checkpoint); returns its record. ``code``: the
    training code's hash (:func:`code_hash`), kept in the record."""
    from ..distillation import distill
    from ..train.loop import latest_checkpoint, list_checkpoints

    if run.finished():
        return _read_json(run.record_path, {})
    resume = run.run_dir.is_dir() and bool(list_checkpoints(run.run_dir))
    before = 0.0
    if resume:
        found = latest_checkpoint(run.run_dir, warn=False)
        resume = found is not None
        before = float(found[1].get("elapsed_seconds", 0.0)) if found else 0.0
    if run.run_dir.exists() and not resume:  # interrupted before its first checkpoint: nothing worth keeping
        shutil.rmtree(run.run_dir)
    config = run.config.model_dump(mode="json")
    config["loop"]["progress"] = progress
    with peak_memory() as peak:
        start = time.perf_counter()
        distill(method=run.method, out=run.run_dir, config=config, resume=resume, evaluate_n=0)
        wall = time.perf_counter() - start
    record = {"label": run.label, "key": run.key, "data": run.data, "method": run.method, "steps": run.steps,
              "seed": run.seed, "iterations": run.config.loop.iterations, "wall_seconds": before + wall,
              "peak_memory_gb": peak["gb"], "peak_memory_kind": peak["kind"], "resumed": resume,
              "training_code": code, "evals": {}}
    atomic_write_json(run.record_path, record)
    return record


def sampled_at(student: Any, steps: int) -> Any:
    """The network of ``student`` as a ``steps``-step student of the same kind (its sampler at the ``steps``-step
    student's times); for the methods of :data:`SAMPLER_ONLY_STEPS`, whose training does not depend on the steps."""
    from ..diffusion.samplers import student_timesteps

    return type(student)(student.generator, student_timesteps(student.schedule, steps), info=student.info)


def load_run_student(run: Run, steps: int) -> Any:
    """The student of ``run`` with ``steps`` steps (Lightning's other rungs from ``run/students/``; ADD's network at
    the ``steps``-step student's times)."""
    from ..api import load_model
    from ..student import load_student

    if steps == run.steps:
        return load_model(run.run_dir)
    if run.method in SAMPLER_ONLY_STEPS:
        return sampled_at(load_model(run.run_dir), steps)
    return load_student(run.run_dir / "students" / f"steps_{steps}")


def _lightning_phase(cfg: Any, steps: int) -> int:
    """The plan index of the last phase of the Lightning stage that trains the ``steps``-step rung."""
    stages = cfg.stages()
    if steps not in stages:
        raise UserError(f"lightning's ladder {stages} has no {steps}-step rung")
    s = stages.index(steps)
    return sum(len(cfg.phase_kinds(i)) for i in range(s + 1)) - 1


def profile_rows(plan: Plan, data: str, measures: "_Measures") -> dict[tuple[str, int], dict[str, Any]]:
    """The step efficiency of every (method, student steps) of ``data``: a short profiled window
    (:func:`fewstep.bench.profile.measure_steps`, ``plan.profile_warmup`` then ``plan.profile_steps`` iterations)
    of the first seed's config (Lightning: its ladder's run in the last phase of each rung's stage), cached in
    ``DIR/profile/<data>.json`` by the run's key. Empty when ``plan.profile_steps`` is 0."""
    import tempfile

    if not plan.profile_steps:
        return {}
    path = plan.out / "profile" / f"{data}.json"
    cache = _read_json(path, {})
    out = {}
    for run in (r for r in plan.runs if r.data == data and r.seed == plan.seeds[0]):
        for k in run.students:
            phase = _lightning_phase(run.config, k) if run.method == "lightning" else None
            key = f"{run.key} phase={phase} warmup={plan.profile_warmup} steps={plan.profile_steps}"

            def measure(run: Run = run, phase: int | None = phase) -> dict[str, Any]:
                from .profile import measure_steps

                with tempfile.TemporaryDirectory(prefix="fewstep-profile-") as work:
                    result = measure_steps(run.method, run.config, work, plan.profile_warmup, plan.profile_steps,
                                           phase=phase)
                return {"network_share": result["network_share"], "step_ms_profiled": result["step_ms_profiled"],
                        "top_non_network": result["top_non_network"], "ms_per_step": result["ms_per_step"]}

            out[(run.method, k)] = measures.get(cache, key, measure, lambda: atomic_write_json(path, cache))
    return out


@dataclass
class _Measures:
    """Evaluation bookkeeping of one invocation: the evaluation code's hash, whether to measure again, and the
    cached results made by other code (counted for the warning)."""

    code: str
    remeasure: bool = False
    stale: int = 0
    measured: set[tuple[int, str]] = field(default_factory=set)  # (id of the cache, key) measured by this one

    def get(self, cache: dict[str, Any], key: str, measure: Any, save: Any) -> dict[str, Any]:
        """``cache[key]``'s result, measured (and saved) when missing or, remeasuring, not yet measured now."""
        entry = cache.get(key)
        if entry is None or self.remeasure and (id(cache), key) not in self.measured:
            entry = cache[key] = {"result": measure(), "code": self.code}
            self.measured.add((id(cache), key))
            save()
        elif entry.get("code") != self.code:
            self.stale += 1
        return entry["result"]


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {m: result[m] for m in METRICS if result.get(m) is not None}


def evaluate_run(run: Run, record: dict[str, Any], n: int, measures: _Measures) -> list[dict[str, Any]]:
    """One row per student of ``run`` (evaluation seed = training seed), measured or from the record's cache."""
    from ..api import evaluate

    evals = record.setdefault("evals", {})
    rows = []
    for k in run.students:
        result = measures.get(evals, f"steps={k} n={n} seed={run.seed}",
                              lambda: evaluate(load_run_student(run, k), n=n, seed=run.seed),
                              lambda: atomic_write_json(run.record_path, record))
        rows.append({"data": run.data, "method": run.method, "variant": "full", "steps": k, **_metrics(result),
                     "iterations": record.get("iterations"), "wall_seconds": record.get("wall_seconds"),
                     "peak_memory_gb": record.get("peak_memory_gb"),
                     "seed": run.seed})
    return rows


def _teacher_key(sampler: str, steps: int, n: int, seed: int) -> str:
    return f"{sampler} steps={steps} n={n} seed={seed}"


def teacher_rows(plan: Plan, data: str, measures: _Measures) -> list[dict[str, Any]]:
    """The embedded teacher of ``data`` at every setting of ``plan.teacher_settings``, averaged over the plan's seeds
    (sampling seeds), cached in ``DIR/teacher/<data>.json`` (by the teacher's weights)."""
    from ..api import evaluate, load_teacher

    path = plan.out / "teacher" / f"{data}.json"
    file = _read_json(path, {})
    weights = _weights_hash(data)
    cache = file.get(weights, {})
    file = {weights: cache}  # other weights' measurements are dropped
    teacher: list[Any] = []
    rows = []
    for sampler, steps in plan.teacher_settings:
        per_seed = []
        for seed in plan.seeds:
            def measure() -> dict[str, Any]:
                teacher[:] = teacher or [load_teacher(data)]
                return evaluate(teacher[0], n=plan.n, steps=steps, sampler=sampler, seed=seed)

            result = measures.get(cache, _teacher_key(sampler, steps, plan.n, seed), measure,
                                  lambda: atomic_write_json(path, file))
            per_seed.append({"data": data, "method": "teacher", "variant": sampler, "steps": steps,
                             **_metrics(result), "iterations": None, "wall_seconds": None})
        rows.append(average(per_seed))
    return rows


def _teacher_cached(plan: Plan, data: str) -> bool:
    cache = _read_json(plan.out / "teacher" / f"{data}.json", {}).get(_weights_hash(data), {})
    return all(_teacher_key(s, k, plan.n, seed) in cache for s, k in plan.teacher_settings for seed in plan.seeds)


