"""Step efficiency: the share of a training step's time spent in the networks' forward and backward passes.

    OMP_NUM_THREADS=1 python benchmarks/step_efficiency.py                     # every method on digits
    OMP_NUM_THREADS=1 python benchmarks/step_efficiency.py --methods dmd2 --steps 30

Each method trains on the embedded digits teacher with its shipped config (configs/<method>_digits.yaml) through the
real loop (:func:`fewstep.train.loop.train`): ``--warmup`` iterations, then ``--steps`` measured ones, once plainly
(the wall time of a step) and once under the PyTorch profiler (CPU activities), which splits each step's time:

* a **step** is the time from the start of one iteration to the start of the next: the loop's reseeding, batch, every
  scheduled player's update, logging and the checkpoint check (the end-of-run checkpoint falls outside);
* **network forward**: the outermost calls of the networks' modules, i.e. every ``nn.Module`` call whose class comes
  from ``torch.nn`` (not ``torch.nn.parallel``), ``fewstep.models``, ``peft`` or ``diffusers``, not nested in another
  such call (``Denoiser`` and the methods' player modules are wrappers: their own code, the schedule's conversions
  and the losses, is not network time). Each is a ``record_function`` scope opened by global forward hooks;
* **network backward**: the autograd nodes recorded inside those scopes (matched by the profiler's sequence numbers,
  wherever they run: ``backward`` or an ``autograd.grad`` in a loss) and the gradient accumulation into parameters;
* the rest is **non-network** time, attributed to the innermost of these scopes: the loss code outside the networks
  (``loss math``), backward nodes of that code, the optimizer step, ``zero_grad``, gradient clipping, the LR schedule,
  the EMA update, reseeding, the batch draw, host syncs (``.item()`` of the loop's ``_to_float`` and the processes'
  agreement), logging, the checkpoint check, and the loop's own Python.

The network share is network time over step time, both measured under the profiler (which adds its per-op cost to
networks and loss code alike); the plain step time is printed beside it. Writes
benchmarks/results/step_efficiency.json (rows: data, method, variant ``default`` or ``--variant``, steps,
``network_share``, ``step_ms``, ``step_ms_profiled``, and each category's milliseconds per step; each method's row as
it is measured) and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402

from common import ROOT, markdown_table, meta, write_results  # noqa: E402

NETWORK_MODULES = ("torch.nn.", "fewstep.models", "peft", "diffusers")
STEP = "fewstep::step"
NET = "fewstep::network_forward"
NET_BACKWARD = "network backward"
#: patched callables: (owner, attribute, category) -- their time, less what they contain of the networks'
SCOPES = [
    ("fewstep.train.loop", "set_random_seed", "reseeding"),
    ("fewstep.train.loop", "batch_indices", "batch draw"),
    ("fewstep.train.loop", "_to_float", "host syncs (.item())"),
    ("fewstep.train.loop", "_all_processes_agree", "host syncs (.item())"),
    ("fewstep.train.loop", "_log", "logging"),
    ("fewstep.train.loop", "_checkpoint_due", "checkpoint check"),
    ("fewstep.train.ema.EMA", "update", "EMA update"),
    ("accelerate.Accelerator", "backward", "backward (autograd engine, non-network nodes)"),
    ("accelerate.Accelerator", "clip_grad_norm_", "gradient clipping"),
    ("torch.optim.lr_scheduler.LRScheduler", "step", "LR schedule"),
]
#: the profiler's own scopes of optimizer calls (name prefix: category)
BUILTIN = {"Optimizer.step": "optimizer step", "Optimizer.zero_grad": "zero_grad"}


def _resolve(path: str) -> Any:
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def _scoped(fn: Any, name: str) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def is_network(module: nn.Module) -> bool:
    """Whether a module call is network time (see the module docstring)."""
    where = type(module).__module__ + "."
    return where.startswith(NETWORK_MODULES) and not where.startswith("torch.nn.parallel")


@contextlib.contextmanager
def network_scopes() -> Iterator[None]:
    """Global forward hooks: each outermost network call runs inside a ``NET`` record_function scope."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    open_: list[Any] = []  # the scope of the outermost call, while one runs
    depth = [0]

    def pre(module: nn.Module, args: Any) -> None:
        if is_network(module):
            if depth[0] == 0:
                scope = record_function(NET)
                scope.__enter__()
                open_.append(scope)
            depth[0] += 1

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if is_network(module):
            depth[0] -= 1
            if depth[0] == 0:
                open_.pop().__exit__(None, None, None)

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def scopes(method: Any) -> Iterator[None]:
    """Every entry of :data:`SCOPES`, the step (``_train_step``) and the method's losses as record_function scopes."""
    import fewstep.train.loop as loop

    with contextlib.ExitStack() as stack:
        for owner, attr, name in SCOPES:
            obj = _resolve(owner)
            stack.enter_context(mock.patch.object(obj, attr, _scoped(getattr(obj, attr), name)))
        stack.enter_context(mock.patch.object(loop, "_train_step", _scoped(loop._train_step, STEP)))
        stack.enter_context(mock.patch.object(method, "loss", _scoped(method.loss, "loss math")))
        yield


def _children(events: list[Any]) -> tuple[dict[int, list[Any]], list[Any]]:
    kids: dict[int, list[Any]] = {}
    roots = []
    for e in events:
        if e.cpu_parent is None:
            roots.append(e)
        else:
            kids.setdefault(e.cpu_parent.id, []).append(e)
    return kids, roots


def attribute(events: list[Any], warmup: int) -> dict[str, float]:
    """Microseconds per category over the steps after the first ``warmup`` (each step: from its start to the next's;
    the last step scope only closes the interval), and ``"step"``: the number of steps measured."""
    events = [e for e in events if e.device_type.name == "CPU"]
    steps = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    lo, hi = steps[warmup].time_range.start, steps[-1].time_range.start
    net_seq = set()
    kids, roots = _children(events)

    def mark(e: Any, inside: bool) -> None:
        inside = inside or e.name == NET
        if inside and e.sequence_nr >= 0:
            net_seq.add((e.thread, e.sequence_nr))
        for c in kids.get(e.id, []):
            mark(c, inside)

    for r in roots:
        mark(r, False)

    totals: dict[str, float] = {}

    def category(e: Any, inherited: str) -> str:
        if e.name == NET:
            return "network forward"
        if e.name.startswith("autograd::engine::evaluate_function"):
            if "AccumulateGrad" in e.name or (e.fwd_thread, e.sequence_nr) in net_seq:
                return NET_BACKWARD
            return "backward (autograd engine, non-network nodes)"
        if inherited in ("network forward", NET_BACKWARD):
            return inherited
        for prefix, name in BUILTIN.items():
            if e.name.startswith(prefix):
                return name
        if e.name == STEP:
            return "loop Python"
        if e.name in {n for _, _, n in SCOPES} or e.name == "loss math":
            return e.name
        return inherited

    def walk(e: Any, inherited: str) -> None:
        cat = category(e, inherited)
        children = kids.get(e.id, [])
        start, end = max(e.time_range.start, lo), min(e.time_range.end, hi)
        if end > start:
            covered = sum(max(0.0, min(c.time_range.end, hi) - max(c.time_range.start, lo)) for c in children)
            totals[cat] = totals.get(cat, 0.0) + (end - start) - covered
        for c in children:
            walk(c, cat)

    covered = 0.0
    for r in roots:
        if r.time_range.end > lo and r.time_range.start < hi:
            walk(r, "loop Python")
            covered += min(r.time_range.end, hi) - max(r.time_range.start, lo)
    totals["loop Python"] = totals.get("loop Python", 0.0) + (hi - lo) - covered  # between the scopes
    totals["step"] = len(steps) - 1 - warmup
    totals["total"] = hi - lo
    return totals


def run_method(method_name: str, work: Path, warmup: int, steps: int, profile: bool, seed: int = 0,
               phase: str | None = None) -> dict[str, Any]:
    """One run of ``warmup + steps + 1`` iterations; plain: the median step milliseconds; profiled: the split.

    The method is built for the config's whole budget (its LR schedules, and SDXL-Lightning's plan of phases, are a
    real run's); only the loop stops after the measured iterations. Built for those few iterations instead,
    Lightning would squeeze its whole ladder into them and switch phase every third step. ``phase`` (Lightning): a
    phase kind (``mse``, ``lora_cond``, ``lora_uncond``, ``full_uncond``, ...) of the last stage to measure in (the
    method walks its plan's switches up to that phase first); default: the plan's first phase."""
    import fewstep.train.loop as loop
    from fewstep.api import load_teacher
    from fewstep.distillation import make_config, prepare_data
    from fewstep.methods import registry

    config = ROOT / "configs" / f"{method_name}_digits.yaml"
    iterations = warmup + steps + 1
    cfg = make_config(method_name, config, seed=seed, progress=False, checkpoint_minutes=None)
    run_loop = cfg.loop.model_copy(update={"iterations": iterations, "checkpoint_every": 10 * iterations})
    teacher = load_teacher(cfg.teacher)
    data = prepare_data(teacher, cfg.data or "digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method = registry()[method_name][1](teacher, cfg)
        if phase is not None:
            if not hasattr(method, "phases"):
                raise SystemExit(f"--phase: {method_name} has no phases (SDXL-Lightning has)")
            last = method.phases[-1][0]
            target = next((j for j, (st, kind, _, _) in enumerate(method.phases) if st == last and kind == phase), None)
            if target is None:
                raise SystemExit(f"--phase {phase}: the last stage's phases are "
                                 + ", ".join(k for st, k, _, _ in method.phases if st == last))
            for j in range(method.phase + 1, target + 1):
                method._switch(j)
            # the loop's iterations are the plan's first few: keep the method in the chosen phase
            method.phase_at = lambda it: target  # type: ignore[method-assign]
    out = work / f"{method_name}-{'profiled' if profile else 'plain'}"
    if not profile:
        starts: list[float] = []
        step_fn = loop._train_step

        def timed(run: Any, it: int) -> None:
            starts.append(time.perf_counter())
            step_fn(run, it)

        with mock.patch.object(loop, "_train_step", timed):
            loop.train(method, data, run_loop, out, config=cfg)
        gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
        return {"steps": cfg.steps, "step_ms": 1e3 * statistics.median(gaps),
                "step_ms_mean": 1e3 * statistics.fmean(gaps)}
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    # the profiler records iterations warmup .. warmup + steps only (prof.step() as each iteration starts)
    plan = schedule(wait=max(0, warmup - 1), warmup=min(1, warmup), active=steps + 1, repeat=1)
    with torch_profile(activities=[ProfilerActivity.CPU], schedule=plan) as prof, scopes(method):
        step_fn = loop._train_step  # in its STEP scope

        def stepped(run: Any, it: int) -> None:
            if it > 0:
                prof.step()
            step_fn(run, it)

        with mock.patch.object(loop, "_train_step", stepped), network_scopes():
            loop.train(method, data, run_loop, out, config=cfg)
    totals = attribute(list(prof.events()), 0)
    n = totals.pop("step")
    total = totals.pop("total")
    ms = {k: v / 1e3 / n for k, v in totals.items()}
    net = ms.get("network forward", 0.0) + ms.get(NET_BACKWARD, 0.0)
    return {"steps": cfg.steps, "step_ms_profiled": total / 1e3 / n, "network_share": net / (total / 1e3 / n),
            "ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["dmd2", "add", "lightning", "disback"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="measured iterations per method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="default", help="the rows' variant (e.g. 'before' for an older tree)")
    p.add_argument("--phase", default=None,
                   help="SDXL-Lightning: measure in this phase kind of its last stage (e.g. full_uncond) instead of "
                        "the plan's first (the 8-step MSE stage); the row's variant gets '@<phase>'")
    p.add_argument("--no-write", action="store_true", help="print only (do not update the results file)")
    a = p.parse_args()
    torch.set_num_threads(1)

    rows = []
    work = Path(tempfile.mkdtemp(prefix="fewstep-steps-"))
    try:
        for name in a.methods:
            phase = a.phase if name == "lightning" else None
            plain = run_method(name, work, a.warmup, a.steps, profile=False, seed=a.seed, phase=phase)
            prof = run_method(name, work, a.warmup, a.steps, profile=True, seed=a.seed, phase=phase)
            split = prof.pop("ms_per_step")
            non_net = {k: v for k, v in split.items() if k not in ("network forward", NET_BACKWARD)}
            top = sorted(non_net.items(), key=lambda kv: -kv[1])[:5]
            variant = f"{a.variant}@{phase}" if phase else a.variant
            rows.append({"data": "digits", "method": name, "variant": variant, "steps": plain["steps"],
                         "network_share": prof["network_share"], "step_ms": plain["step_ms"],
                         "step_ms_profiled": prof["step_ms_profiled"],
                         "network_forward_ms": split.get("network forward", 0.0),
                         "network_backward_ms": split.get(NET_BACKWARD, 0.0),
                         "non_network_ms": non_net,
                         "top_non_network": ", ".join(f"{k} {v:.2f}" for k, v in top),
                         "iterations": a.steps, "wall_seconds": None})
            print(f"{name:>9}: network {100 * prof['network_share']:.1f}% of {prof['step_ms_profiled']:.1f} ms "
                  f"(profiled; plain {plain['step_ms']:.1f} ms); top non-network ms: {rows[-1]['top_non_network']}",
                  flush=True)
            if not a.no_write:  # after each method: a long run that stops keeps what it measured
                path = write_results("step_efficiency", meta([a.seed], warmup=a.warmup, measured_steps=a.steps,
                                                             threads=torch.get_num_threads()), rows[-1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [{**r, "network_share": 100 * r["network_share"]} for r in rows]
    print("\n" + markdown_table(table, ["method", "variant", "steps", "step_ms", "step_ms_profiled",
                                        "network_forward_ms", "network_backward_ms", "network_share",
                                        "top_non_network"]))
    if not a.no_write and rows:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
