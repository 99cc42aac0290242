"""Step efficiency: the share of a training step's time spent in the networks' forward and backward passes, measured
with the PyTorch profiler on a short window of the real loop (:func:`fewstep.train.loop.train`).

Used by ``fewstep bench`` (its ``step efficiency`` column and the report's top non-network costs) and by
``benchmarks/step_efficiency.py``. The split of a step:

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
networks and loss code alike).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import torch
from torch import nn
from torch.autograd.profiler import record_function

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



def _select_phase(method: Any, method_name: str, phase: int | str) -> None:
    """Walk an SDXL-Lightning method's plan to ``phase`` (an index of its plan, or a phase kind of its last stage) and
    keep it there: the measured iterations are the plan's first few."""
    from ..errors import UserError

    if not hasattr(method, "phases"):
        raise UserError(f"phase {phase!r}: {method_name} has no phases (SDXL-Lightning has)")
    if isinstance(phase, int):
        if not 0 <= phase < len(method.phases):
            raise UserError(f"phase {phase}: the plan has phases 0 to {len(method.phases) - 1}")
        target = phase
    else:
        last = method.phases[-1][0]
        target = next((j for j, (st, kind, _, _) in enumerate(method.phases) if st == last and kind == phase), None)
        if target is None:
            raise UserError(f"phase {phase!r}: the last stage's phases are "
                            + ", ".join(k for st, k, _, _ in method.phases if st == last))
    for j in range(method.phase + 1, target + 1):
        method._switch(j)
    method.phase_at = lambda it: target  # type: ignore[method-assign]


def measure_steps(method_name: str, cfg: Any, work: str | Path, warmup: int = 5, steps: int = 20,
                  profile: bool = True, seed: int | None = None, phase: int | str | None = None) -> dict[str, Any]:
    """Train ``warmup + steps + 1`` iterations of ``method_name`` with the resolved config ``cfg`` in ``work`` and
    time them: plain (``step_ms``: the median milliseconds from one iteration's start to the next) or under the
    profiler (``step_ms_profiled``, ``network_share``, ``ms_per_step``: each category's milliseconds per step, and
    ``top_non_network``: the five largest non-network ones).

    The method is built for the config's whole budget (its LR schedules, and SDXL-Lightning's plan of phases, are a
    real run's); only the loop stops after the measured iterations. Built for those few iterations instead,
    Lightning would squeeze its whole ladder into them and switch phase every third step. ``phase`` (Lightning): a
    plan index or a phase kind of the last stage (``mse``, ``lora_cond``, ``full_uncond``, ...) to measure in
    (default: the plan's first phase). ``seed``: the method's initialisation seed (default: the config's)."""
    import fewstep.train.loop as loop

    from ..api import load_teacher, model_data
    from ..distillation import prepare_data
    from ..methods import registry

    iterations = warmup + steps + 1
    run_loop = cfg.loop.model_copy(update={"iterations": iterations, "checkpoint_every": 10 * iterations,
                                           "checkpoint_minutes": None, "progress": False})
    teacher = load_teacher(cfg.teacher)
    data = prepare_data(teacher, cfg.data or model_data(teacher) or "digits")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loop.seed if seed is None else seed)
        method = registry()[method_name][1](teacher, cfg)
        if phase is not None:
            _select_phase(method, method_name, phase)
    out = Path(work) / f"{method_name}-{'profiled' if profile else 'plain'}"
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
    non_net = sorted(((k, v) for k, v in ms.items() if k not in ("network forward", NET_BACKWARD)),
                     key=lambda kv: -kv[1])
    return {"steps": cfg.steps, "step_ms_profiled": total / 1e3 / n, "network_share": net / (total / 1e3 / n),
            "ms_per_step": dict(sorted(ms.items(), key=lambda kv: -kv[1])),
            "top_non_network": ", ".join(f"{k} {v:.2f} ms" for k, v in non_net[:5])}
