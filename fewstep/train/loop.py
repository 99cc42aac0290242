"""The one training loop, on Accelerate (DESIGN.md, style rules 4-6; EDM2 ``training/training_loop.py``).

A :class:`~fewstep.methods.base.Method` supplies players and losses; this loop does everything else:

* **randomness** -- at the start of every iteration ``it`` the global RNGs (torch, numpy, random) are reseeded from
  ``(seed, rank, it)`` (EDM2's ``misc.set_random_seed``), so a resumed run replays exactly the draws of an
  uninterrupted one. The *global* batch's indices are drawn from ``(seed, it)`` alone and process ``rank`` takes
  its contiguous slice, so the data a step sees do not depend on the number of processes: 1 process with batch
  ``B`` and ``P`` processes with ``B / P`` each train on the same examples (with rank 0's stream, a 1-process run
  draws exactly what it drew before). The methods' own noise draws come from the per-rank global RNG: they differ
  across world sizes (ranks must not share noise), so a multi-process run matches a 1-process run in distribution,
  and exactly for a loss that draws nothing (``tests/test_distributed.py``);
* **devices and memory** -- Accelerate places the players (DDP, or FSDP from ``accelerate launch --config_file
  configs/accelerate_fsdp.yaml``) and runs the losses under autocast (``mixed_precision``). With DDP the loop
  averages each player's gradients itself after backward (:func:`average_gradients`; DDP's hooks are off), so a
  method may call a player's sub-networks outside its forward, reuse them within one backward, or freeze and
  unfreeze parameters between phases; the price is no overlap of communication with backward. Under mixed precision
  every frozen parameter (the teacher, LoRA base weights, frozen feature networks) is held in the training dtype
  (:mod:`fewstep.train.memory`); ``gradient_checkpointing`` recomputes the players' activations in backward;
* **updates** -- for each player in ``method.updates(it)``: loss (under Accelerate's autocast), backward, gradient
  clipping, optimizer and LR-schedule step, EMA update; a non-finite loss (or gradient norm) skips the update and is
  counted, and 10 in a row stop the run;
* **logging** -- means over the last ``log_every`` iterations to ``metrics.jsonl`` (one JSON object per line) and
  TensorBoard (``tb/``), the latest losses on a tqdm progress bar;
* **checkpoints** -- ``checkpoints/step_XXXXXXXX.pt`` (``XXXXXXXX`` = iterations done) every ``checkpoint_every``
  iterations, at the end, and once ``checkpoint_minutes`` of wall time have passed since the last one (decided by
  the main process for all), written atomically, the newest ``keep_checkpoints`` kept; tensors and plain values
  only, loaded back with ``torch.load(weights_only=True)``; each carries the run's resolved config;
* **disk** -- before training and before each checkpoint the disk must have room for it (its size estimated from the
  live tensors, plus a margin), else every process stops with one line and the last checkpoint stays intact
  (:func:`_check_disk`, :func:`_no_room`); a resume applies a lowered ``keep_checkpoints`` at once;
* **resume** -- from the newest checkpoint that loads (a damaged one falls back to the one before, with a one-line
  warning); refused when there is none, or when the config differs from the checkpoint's in anything but
  :data:`SAFE_TO_CHANGE_ON_RESUME` and a longer ``loop.iterations``. ``metrics.jsonl`` rows up to the checkpoint
  are kept byte for byte, the ones after it dropped (the resumed run writes them again).

:func:`train` reads as its pieces: :func:`_set_up`, :func:`_prepare_players`, :func:`_restore_run`,
:func:`_check_disk`, :func:`_open_outputs`, then per iteration :func:`_train_step` (:func:`_update` per player),
:func:`_log`, :func:`_checkpoint_due` / :func:`_save_checkpoint`, and :func:`_close` / :func:`_finish`, sharing a
:class:`_Run`.

Steps are counted in *iterations done*: the checkpoint, the log row and the sample grid written after iteration
``it`` (0-based) all carry ``step = it + 1``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickle
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from ..config import LoopConfig, dump_config
from ..errors import UserError
from ..io import (append_text, atomic_torch_save, atomic_write, atomic_write_bytes, free_bytes, show_bytes,
                  tensor_bytes, with_margin)
from ..methods.base import Batch, Method
from .ema import EMA
from .memory import (
    cast_frozen_parameters,
    enable_gradient_checkpointing,
    is_sharded_module,
    load_player_state,
    modules_of,
    gather_player,
    optimizer_parameters,
    player_state,
    shard_player,
    training_dtype,
)

CHECKPOINT_FORMAT = "fewstep-checkpoint"
CRASH_ENV = "FEWSTEP_CRASH_AT_STEP"  # test hook: os._exit(137) right after that step's checkpoint logic
SLOW_WRITE_ENV = "FEWSTEP_SLOW_CHECKPOINT_WRITE"  # test hook: pause this many seconds halfway through each write
#: Config fields (dotted paths) a resume may change: they decide what is logged, shown or kept, never what is trained,
#: so a resumed run still equals an uninterrupted one. ``loop.iterations`` may also grow (to train longer). Any other
#: difference from the checkpoint's config is refused (:func:`check_resume_config`).
SAFE_TO_CHANGE_ON_RESUME = frozenset({
    "loop.log_every", "loop.sample_every", "loop.progress", "loop.keep_checkpoints", "loop.checkpoint_every",
    "loop.checkpoint_minutes",
})
MAX_CONSECUTIVE_NONFINITE = 10
CLOCK_EVERY = 10  # multi-process runs: iterations between the main process's wall-time checkpoint decisions
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


# ----------------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------------
def step_seed(seed: int, rank: int, it: int, stream: int = 0) -> int:
    """A 63-bit seed mixed from ``(seed, rank, it, stream)`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, rank, it, stream]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def set_random_seed(seed: int, rank: int, it: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and ``random`` for iteration ``it`` on process ``rank``.

    The generators ``torch.manual_seed`` seeds (the CPU's and, when there are any, the GPUs'), without its calls
    into the other backends (MPS, XPU, MTIA: 0.3 ms a step on 2 CPU cores): the same seeds, so the same draws."""
    s = step_seed(seed, rank, it)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)  # queued until CUDA initialises, as torch.manual_seed does


def batch_generator(seed: int, rank: int, it: int) -> torch.Generator:
    """A generator for iteration ``it`` on a stream apart from the global RNG's."""
    return torch.Generator().manual_seed(step_seed(seed, rank, it, stream=1))


def batch_indices(n: int, batch_size: int, seed: int, it: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Process ``rank``'s share of iteration ``it``'s global batch: ``batch_size`` indices into ``n`` examples drawn
    from ``(seed, it)`` only (rank 0's stream, for every process), sliced contiguously into ``world`` parts."""
    idx = torch.randint(0, n, (batch_size,), generator=batch_generator(seed, 0, it))
    local = batch_size // world
    return idx[rank * local : (rank + 1) * local]


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------------
# Run directory, checkpoints, metrics
# ----------------------------------------------------------------------------------------------------------------
def check_run_dir(run_dir: str | Path, resume: bool, restart: bool = False) -> None:
    """A run directory is never overwritten: without ``resume`` it must be new or empty (or, with ``restart``, about
    to be moved aside by :func:`set_aside`); with it, it must hold a checkpoint (whether one loads is checked when
    the run restores it)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; choose a new --out")
    if resume and restart:
        raise UserError("--resume and --restart exclude each other; pass one")
    if restart:
        return
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists; pass --resume to continue it, --restart to move it aside and start over, "
                        f"or choose a new --out")
    if resume and not list_checkpoints(run_dir):
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} has no checkpoint to resume from; pass --restart to move it aside and start "
                            f"over, or choose a new --out")
        raise UserError(f"{run_dir} holds no run to resume; drop --resume to start a new run there")


def set_aside(run_dir: str | Path) -> Path | None:
    """``--restart``: rename a non-empty ``run_dir`` to ``<run_dir>.before-restart-<UTC time>`` beside it (one
    rename: nothing is deleted or half-moved), so a new run can start there. Returns the new name (None when there
    was nothing to move). With several processes the main one renames while the others wait."""
    from accelerate import PartialState

    run_dir = Path(run_dir)
    state = PartialState(cpu=not torch.cuda.is_available())
    moved = None
    if run_dir.is_dir() and any(run_dir.iterdir()):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = run_dir.with_name(f"{run_dir.name}.before-restart-{stamp}")
        i = 1
        while moved.exists():
            moved, i = run_dir.with_name(f"{run_dir.name}.before-restart-{stamp}-{i}"), i + 1
        cause = "another process did not move it"
        if state.is_main_process:
            try:
                run_dir.rename(moved)
                warnings.warn(f"--restart: moved the earlier run in {run_dir} to {moved}; starting over",
                              stacklevel=2)
            except OSError as e:
                cause = e.strerror or type(e).__name__
        state.wait_for_everyone()
        if run_dir.is_dir() and any(run_dir.iterdir()):  # on every process alike (no one waits for a failed one)
            raise UserError(f"cannot move {run_dir} aside to {moved} ({cause}); move or remove it yourself, or "
                            f"choose a new --out")
    elif run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; choose a new --out")
    return moved


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, checkpoint's value, current value)`` for each field that differs and that a resume may not
    change (everything but :data:`SAFE_TO_CHANGE_ON_RESUME` and a longer ``loop.iterations``)."""
    a, b = _flatten(stored), _flatten(current)
    absent = object()
    diffs = []
    for key in [*b, *(k for k in a if k not in b)]:
        old, new = a.get(key, absent), b.get(key, absent)
        if old == new or key in SAFE_TO_CHANGE_ON_RESUME:
            continue
        if key == "loop.iterations" and isinstance(old, int) and isinstance(new, int) and new > old:
            continue
        diffs.append((key, None if old is absent else old, None if new is absent else new))
    return diffs


def check_resume_config(stored: dict[str, Any] | None, current: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse (one line naming each differing key and its two values) to resume a run with another config."""
    if not stored:  # a checkpoint from before checkpoints carried their config
        return
    diffs = config_differences(stored, current)
    if diffs:
        shown = "; ".join(f"{k} {_show(old)} (checkpoint) vs {_show(new)} (now)" for k, old, new in diffs)
        raise UserError(f"{run_dir} was made with a different config: {shown}; resume with the same options, or "
                        f"pass --restart to start over")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first (temporary files of interrupted writes are not listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint (tensors and plain values only) onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fewstep checkpoint")
    return state


def latest_checkpoint(run_dir: str | Path, warn: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads cleanly, falling back past corrupt or truncated ones with a one-line warning
    each (``warn=False``: silently)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a truncated zip, a bad pickle, a foreign file: all mean "not usable"
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {_load_failure(e)}; trying the one before", stacklevel=2)
    return None


def _load_failure(e: Exception) -> str:
    """Why a checkpoint does not load, in a few words (torch's own messages run to paragraphs)."""
    text = str(e).strip()
    if "zip archive" in text or "central directory" in text:
        return "it is truncated or damaged (not a complete zip archive)"
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "it is damaged or not a fewstep checkpoint (not tensors and plain values only)"
    first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
    return first if len(first) <= 120 else first[:117] + "..."


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the rows after ``step`` (and a torn last line) from ``metrics.jsonl``; the rows kept stay byte for byte
    as written (the file is cut in place, or rewritten atomically when something in the middle goes)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    kept, rows = [], []
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and isinstance(row.get("it"), int) and row["it"] <= step:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
            rows.append(row)
    text = b"".join(kept)
    if text != data:
        if data.startswith(text):
            os.truncate(path, len(text))
        else:
            atomic_write_bytes(path, text)
    return rows


def _remove_temporaries(run_dir: Path) -> None:
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp"):
            p.unlink(missing_ok=True)


def _write_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """``atomic_torch_save``; with the test hook :data:`SLOW_WRITE_ENV` set, it pauses halfway through the bytes (so a
    kill can land mid-write)."""
    pause = float(os.environ.get(SLOW_WRITE_ENV) or 0)
    if pause <= 0:
        atomic_torch_save(ckpt, path)
        return
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()

    def write(f: Any) -> None:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(pause)
        f.write(data[len(data) // 2:])

    atomic_write(path, write)


def _prune_checkpoints(run_dir: Path, keep: int, upto: Path | None = None) -> None:
    """Remove all but the newest ``keep`` checkpoints; with ``upto`` (the one a run resumes from), of those up to it
    (newer ones did not load and are left as they are)."""
    paths = list_checkpoints(run_dir)
    if upto is not None:
        paths = paths[: paths.index(upto) + 1]
    for p in paths[:-keep]:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Accelerate
# ----------------------------------------------------------------------------------------------------------------
def make_accelerator(mixed_precision: str = "no") -> Any:
    """An ``Accelerator`` on the GPU when there is one; a second run in the same process may change precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    kwargs = dict(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        # Accelerate keeps one process-wide state; a later run in the same Python session (a notebook: train a
        # teacher, then distil in bf16) resets the per-run part of it. The distributed PartialState is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
        accelerator = Accelerator(**kwargs)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warnings.warn("fp16 mixed precision needs a GPU; training in float32 on the CPU", stacklevel=2)
    if mixed_precision == "bf16" and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support (it needs Ampere or newer); set loop.mixed_precision to "
                        "fp16 or no")
    return accelerator


def check_fsdp_support(method: Any) -> None:
    """A one-line error for a method that cannot train sharded (``supports_fsdp = False``), before any training."""
    if not getattr(method, "supports_fsdp", True):
        raise UserError(f"{type(method).__name__} cannot train sharded (it loads whole state dicts into its players "
                        "between phases); train it with DDP (configs/accelerate_ddp.yaml, loop.fsdp: false)")


def _is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _all_processes_agree(accelerator: Any, ok: bool) -> bool:
    """``ok`` on every process (so that every process skips, or takes, the same updates)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() > 0.5)


def average_gradients(module: torch.nn.Module, device: Any, bucket_numel: int = 1 << 24) -> None:
    """Average ``module``'s gradients over all processes (what DDP does in backward), in flat buckets.

    A parameter with a gradient on some process but none on another gets zeros there first (as DDP does); one with
    no gradient anywhere keeps ``None`` (the optimizer skips it, as in a 1-process run).
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(has)
    grads = []
    for p, h in zip(params, has.tolist()):
        if h > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for g in grads:
        groups = buckets.setdefault(g.dtype, [[]])
        if groups[-1] and sum(x.numel() for x in groups[-1]) + g.numel() > bucket_numel:
            groups.append([])
        groups[-1].append(g)
    for groups in buckets.values():
        for group in groups:
            flat = torch._utils._flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, avg in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                g.copy_(avg)


def _warn_if_out_of_sync(method: Method, names: list[str], accelerator: Any, step: int, warned: set[str]) -> None:
    """Replicated players must stay identical on every process; a weight checksum that differs means the method drew
    something per process that all processes must agree on (e.g. a re-initialisation from the global RNG, which the
    loop seeds per rank). Warns once per player; costs one small all-gather per log row."""
    sums = []
    for name in names:
        module = accelerator.unwrap_model(method.players[name].module)
        sums.append(torch.stack([p.detach().double().sum() for p in module.parameters()]).sum()
                    if any(True for _ in module.parameters()) else torch.zeros((), dtype=torch.float64))
    gathered = accelerator.gather(torch.stack(sums).to(accelerator.device).reshape(1, -1)).reshape(-1, len(names))
    for i, name in enumerate(names):
        col = gathered[:, i]
        if name not in warned and bool((col != col[0]).any()):
            warned.add(name)
            warnings.warn(f"iteration {step}: player {name!r} differs across processes (weight sums {col.tolist()}); "
                          f"the method draws something per process that every process must agree on", stacklevel=3)


def _window_means(accelerator: Any, window: dict[str, list[float]]) -> dict[str, float]:
    """Means since the last log row, averaged over processes (each process saw its own share of the batch)."""
    means = {k: s / c for k, (s, c) in sorted(window.items()) if c > 0}
    if accelerator.num_processes > 1 and means:
        values = torch.tensor(list(means.values()), dtype=torch.float64, device=accelerator.device)
        means = dict(zip(means, accelerator.reduce(values, reduction="mean").tolist()))
    return means


def _to_float(v: Any) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


# ----------------------------------------------------------------------------------------------------------------
# The loop: set-up, restore, one step, log, checkpoint, finish
# ----------------------------------------------------------------------------------------------------------------
def _now() -> float:
    """The loop's clock (seconds; monotonic): elapsed time and wall-time checkpoints. Tests replace it."""
    return time.perf_counter()


@dataclass
class _Run:
    """What the pieces of one :func:`train` call share: the set-up, and the state checkpoints carry."""

    method: Method
    cfg: LoopConfig
    run_dir: Path
    accelerator: Any
    x: torch.Tensor
    labels: torch.Tensor | None
    fsdp: bool
    run_config: dict[str, Any]  # the resolved config, kept in every checkpoint and compared on resume
    emas: dict[str, EMA] = field(default_factory=dict)
    skeletons: dict[str, torch.nn.Module] = field(default_factory=dict)  # FSDP: plain modules to gather into
    sharded: dict[str, bool] = field(default_factory=dict)
    manual_sync: bool = False  # gradients averaged after backward (DDP's hooks off)
    replicated: list[str] = field(default_factory=list)  # players whose gradients the loop averages
    restore_dtypes: Callable[[list[torch.nn.Module]], None] | None = None
    # carried by checkpoints
    start: int = 0
    elapsed_before: float = 0.0
    nonfinite_total: int = 0
    consecutive_bad: int = 0
    window: dict[str, list[float]] = field(default_factory=dict)  # key -> [sum, count] since the last log row
    # this process's
    elapsed: float = 0.0
    last_row: dict[str, Any] = field(default_factory=dict)
    latest_loss: dict[str, float] = field(default_factory=dict)
    out_of_sync: set[str] = field(default_factory=set)  # players already warned about
    writer: Any = None
    pbar: Any = None
    t0: float = 0.0
    last_checkpoint_time: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(
    method: Method,
    dataset: Any,
    cfg: LoopConfig,
    run_dir: str | Path,
    resume: bool = False,
    sample_fn: Callable[[int, Path], None] | None = None,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    config: BaseModel | None = None,
) -> dict[str, Any]:
    """Train ``method`` on ``dataset`` for ``cfg.iterations`` iterations, writing the run into ``run_dir``.

    Args:
        method: the loss object; its players' modules and optimizers are prepared with Accelerate in place.
        dataset: anything with ``x`` (an ``(N, ...)`` float tensor) and ``labels`` (``(N,)`` int64 or None).
        cfg: the loop options.
        run_dir: the run directory (new or empty unless ``resume``).
        resume: continue from the newest checkpoint in ``run_dir`` that loads; refused when there is none, or when
            ``config`` differs from the checkpoint's beyond :data:`SAFE_TO_CHANGE_ON_RESUME` and a longer
            ``loop.iterations``.
        sample_fn: ``sample_fn(step, path)`` writes a sample grid to ``path``; called every ``cfg.sample_every``
            iterations and at the end, on the main process only.
        log_fn: called with every row written to ``metrics.jsonl`` (main process only).
        config: the run's complete, resolved config: written to ``run_dir/config.yaml`` and kept in checkpoints.

    Returns:
        The last logged row: ``it``, ``<player>/loss``, ``<player>/<stat>``, ``<player>/lr``, ``nonfinite_skipped``,
        ``seconds`` (and, on a GPU, ``max_memory_gb``: this process's peak allocated memory so far).
    """
    run = _set_up(method, dataset, cfg, Path(run_dir), resume, config)
    _prepare_players(run)
    if resume:
        _restore_run(run)
    _check_disk(run)
    _open_outputs(run, resume, config)
    crash_at = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
    try:
        for it in range(run.start, cfg.iterations):
            _train_step(run, it)
            step = it + 1
            if step % cfg.log_every == 0 or step == cfg.iterations:
                _log(run, step, log_fn)
            if sample_fn is not None and _sample_due(run, step):
                with run.accelerator.autocast():  # frozen parts may be held in the training dtype
                    sample_fn(step, run.run_dir / "samples" / f"step_{step:08d}.png")
            if _checkpoint_due(run, step):
                _save_checkpoint(run, step)
            if crash_at is not None and step == crash_at:
                os._exit(137)  # the test hook: die like kill -9, no cleanup, no flush
    finally:
        _close(run)
    return _finish(run, sample_fn)


def _set_up(method: Method, dataset: Any, cfg: LoopConfig, run_dir: Path, resume: bool,
            config: BaseModel | None) -> _Run:
    """Check the run directory, the data and the options; start Accelerate; move the method to its device."""
    check_run_dir(run_dir, resume)
    accelerator = make_accelerator(cfg.mixed_precision)
    world = accelerator.num_processes
    accelerator.wait_for_everyone()  # every process has checked the directory before the first write

    x = dataset.x
    if int(x.shape[0]) == 0:
        raise UserError("the training data is empty")
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly across {world} processes")

    # FSDP: from an `accelerate launch` FSDP config or loop.fsdp; either way fewstep shards the players itself
    # (shard_player) so that the methods run unchanged, and Accelerate only provides the processes.
    fsdp = _is_fsdp(accelerator) or (cfg.fsdp and world > 1)
    if cfg.fsdp and world == 1:
        warnings.warn("loop.fsdp with one process: nothing to shard; training unsharded", stacklevel=3)
    if fsdp and accelerator.scaler is not None:
        raise UserError("fp16 mixed precision is not supported with FSDP (its loss scaler needs Accelerate's own "
                        "wrapping); set loop.mixed_precision to bf16")
    if fsdp:
        check_fsdp_support(method)
        with_ema = [name for name, p in method.players.items() if p.ema_decay is not None]
        if with_ema:
            raise UserError(f"an EMA of player(s) {with_ema} is not supported under FSDP (it would need the full "
                            f"weights on every process); set the method's ema_decay to null or train with DDP")
    method.run_dir = run_dir
    method.dataset = dataset
    method.to(accelerator.device)  # frozen teachers and precomputed tensors (DisBack records its path here)
    run_config = config.model_dump(mode="json") if config is not None else {"loop": cfg.model_dump(mode="json")}
    return _Run(method, cfg, run_dir, accelerator, x, getattr(dataset, "labels", None), fsdp, run_config)


def _prepare_players(run: _Run) -> None:
    """Frozen weights in the training dtype, EMA copies, then each player sharded (FSDP) or prepared (DDP)."""
    method, cfg, accelerator = run.method, run.cfg, run.accelerator
    # Frozen weights in the training dtype (players' frozen parts too: LoRA bases), before the EMA copies.
    low = training_dtype(cfg.mixed_precision, accelerator.device)
    if low is not None:
        held = optimizer_parameters(p.optimizer for p in method.players.values())
        run.restore_dtypes = cast_frozen_parameters(modules_of(method), low, keep=held)
    if cfg.gradient_checkpointing:
        if not sum(enable_gradient_checkpointing(p.module) for p in method.players.values()):
            warnings.warn("gradient_checkpointing: none of the players' networks supports it; training without",
                          stacklevel=4)

    # EMA copies are taken before Accelerate wraps the modules (and patches forward for autocast).
    # FSDP shards the large players; one with under 10% of the largest one's parameters (ADD's heads, whose R1
    # penalty differentiates twice, which FSDP cannot) stays replicated, its gradients averaged like DDP's.
    sizes = {key: sum(q.numel() for q in p.module.parameters() if q.requires_grad) for key, p in method.players.items()}
    to_shard = {key for key, size in sizes.items() if run.fsdp and size >= 0.1 * max(sizes.values())}
    for name, player in method.players.items():
        if player.ema_decay is not None:
            run.emas[name] = EMA(player.module, player.ema_decay)
        if name in to_shard:
            run.skeletons[name] = copy.deepcopy(player.module).to("meta")  # to hand back a plain module at the end
            player.module = shard_player(player.module.to(accelerator.device), player.optimizer, low)
        elif run.fsdp:  # replicated beside sharded players: not given to Accelerate, which would shard it
            player.module = player.module.to(accelerator.device)
        else:
            player.module, player.optimizer = accelerator.prepare(player.module, player.optimizer)
        if name in run.emas:
            run.emas[name].to(accelerator.device)
            player.ema = run.emas[name].module
    run.sharded = {key: is_sharded_module(p.module) for key, p in method.players.items()}
    # Unsharded multi-process runs average gradients after backward instead of in DDP's backward hooks, so a method
    # may use a player's parameters outside its forward, several times in one backward, or freeze and unfreeze them
    # between phases (Lightning) -- all of which DDP's reducer refuses. (FSDP reduces in its own backward.)
    run.manual_sync = run.world > 1 and not any(run.sharded.values())
    run.replicated = [key for key in method.players if run.world > 1 and not run.sharded[key]]


def _restore_run(run: _Run) -> None:
    """Continue from the newest checkpoint that loads. Refused (before anything in the run is touched) when there is
    none, or when it was made with another config; then the ``metrics.jsonl`` rows after it are dropped."""
    cfg = run.cfg
    found = latest_checkpoint(run.run_dir, warn=run.main)
    if found is None:
        raise UserError(f"{run.run_dir} has no checkpoint that loads, so there is nothing to resume; pass --restart "
                        f"to move it aside and start over, or choose a new --out")
    path, ckpt = found
    start = int(ckpt["iteration"])
    if start > cfg.iterations:
        raise UserError(f"{path} is at iteration {start}, past the {cfg.iterations} iterations asked for; "
                        f"pass --iterations {start} or more to continue this run")
    check_resume_config(ckpt.get("config"), run.run_config, run.run_dir)
    _restore(run.method, run.emas, run.accelerator, ckpt, path, run.sharded)
    log = ckpt.get("log", {})
    run.start = start
    run.elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
    run.nonfinite_total = int(log.get("nonfinite_skipped", 0))
    run.consecutive_bad = int(log.get("consecutive_nonfinite", 0))
    run.window = {k: [float(v[0]), float(v[1])] for k, v in log.get("window", {}).items()}
    run.accelerator.wait_for_everyone()
    if run.main:
        _remove_temporaries(run.run_dir)
        _prune_checkpoints(run.run_dir, cfg.keep_checkpoints, upto=path)  # a lowered keep_checkpoints frees disk now
        rows = _truncate_metrics(run.metrics_path, start)
        run.last_row = rows[-1] if rows else {}


def _open_outputs(run: _Run, resume: bool, config: BaseModel | None) -> None:
    """The run directory, its ``config.yaml``, TensorBoard and the progress bar (main process); the clocks."""
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            dump_config(config, run.run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.run_dir / "tb"), purge_step=run.start + 1 if resume else None)
    from tqdm.auto import tqdm

    run.pbar = tqdm(total=run.cfg.iterations, initial=run.start, disable=not (run.cfg.progress and run.main),
                    dynamic_ncols=True, desc=run.run_dir.name, unit="it")
    run.t0 = run.last_checkpoint_time = _now()


def _train_step(run: _Run, it: int) -> None:
    """Iteration ``it``: reseed, draw this process's share of the batch, update each scheduled player."""
    cfg, accelerator = run.cfg, run.accelerator
    # the draws of this iteration: a function of (seed, rank, it) only
    set_random_seed(cfg.seed, run.rank, it)
    idx = batch_indices(int(run.x.shape[0]), cfg.batch_size, cfg.seed, it, run.rank, run.world)
    batch = Batch(run.x[idx], None if run.labels is None else run.labels[idx]).to(accelerator.device)
    for name in run.method.updates(it):
        _update(run, name, batch, it)
    run.elapsed = run.elapsed_before + _now() - run.t0
    if run.latest_loss:
        run.pbar.set_postfix({k: f"{v:.4g}" for k, v in run.latest_loss.items()}, refresh=False)
    run.pbar.update(1)


def _update(run: _Run, name: str, batch: Batch, it: int) -> None:
    """One player's update: loss, backward, gradient averaging and clipping, optimizer, LR schedule and EMA steps; a
    non-finite loss or gradient norm skips it (on every process alike)."""
    method, accelerator = run.method, run.accelerator
    player = method.players[name]
    with contextlib.ExitStack() as no_sync:
        if run.manual_sync:  # DDP's hooks off for every player: gradients are averaged below
            for other in method.players.values():
                no_sync.enter_context(accelerator.no_sync(other.module))
        with accelerator.autocast():
            loss, stats = method.loss(name, batch, it)
        loss_value = _to_float(loss)
        ok = _all_processes_agree(accelerator, math.isfinite(loss_value))
        if ok:
            accelerator.backward(loss)
    if ok:
        if name in run.replicated:
            average_gradients(player.module, accelerator.device)
        if player.grad_clip is not None:
            norm = _to_float(_clip_gradients(run, name, player))
            # with fp16 an inf norm is the grad scaler's business (it skips the step itself)
            if not math.isfinite(norm) and accelerator.scaler is None:
                ok = False
    if ok:
        player.optimizer.step()
        if player.lr_scheduler is not None:
            player.lr_scheduler.step()
        if name in run.emas:
            run.emas[name].update(accelerator.unwrap_model(player.module), it)
        run.consecutive_bad = 0
        run.latest_loss[name] = loss_value
        for key, value in {"loss": loss_value, **stats}.items():
            acc = run.window.setdefault(f"{name}/{key}", [0.0, 0.0])
            # a GPU's tensors stay there (no host sync a stat) and sum in float64, as the floats they replace
            on_device = torch.is_tensor(value) and value.device.type != "cpu"
            acc[0] = acc[0] + (value.detach().float().double() if on_device else _to_float(value))
            acc[1] += 1.0
    else:
        run.nonfinite_total += 1
        run.consecutive_bad += 1
        warnings.warn(f"iteration {it}: non-finite loss or gradient for {name!r}; update skipped", stacklevel=2)
    # every player's gradients: one player's loss may backpropagate into another's network (DMD2's generator loss
    # runs through the fake score's encoder), and those must not leak into its next step
    for other in method.players.values():
        other.optimizer.zero_grad(set_to_none=True)
    if run.consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
        raise UserError(f"training diverged: {run.consecutive_bad} non-finite losses in a row at iteration {it}; "
                        f"lower the learning rate (or enable gradient clipping)")


def _clip_gradients(run: _Run, name: str, player: Any) -> Any:
    """Clip ``player``'s gradients to ``grad_clip`` and return their norm before clipping: Accelerate's call (it
    unscales fp16 gradients first) with PyTorch's multi-tensor kernels for an unsharded player (on CPUs PyTorch
    otherwise clips tensor by tensor); a sharded player's norm is FSDP's business."""
    accelerator = run.accelerator
    if run.sharded.get(name):
        return accelerator.clip_grad_norm_(player.module.parameters(), player.grad_clip)
    accelerator.unscale_gradients()
    params = [p for p in player.module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, player.grad_clip, foreach=True)


def _window_floats(window: dict[str, list[Any]]) -> dict[str, list[float]]:
    """The log window with its sums as floats (one host sync for all the device tensors among them)."""
    keys = [k for k, (s, _) in window.items() if torch.is_tensor(s)]
    device = window[keys[0]][0].device if keys else None
    values = torch.stack([window[k][0].reshape(()).to(device) for k in keys]).tolist() if keys else []
    floats = dict(zip(keys, values))
    return {k: [floats.get(k, s), float(c)] for k, (s, c) in window.items()}


def _log(run: _Run, step: int, log_fn: Callable[[dict[str, Any]], None] | None) -> None:
    """One row of means since the last one: ``metrics.jsonl``, TensorBoard and ``log_fn`` (main process)."""
    accelerator = run.accelerator
    row: dict[str, Any] = {"it": step}
    row.update(_window_means(accelerator, _window_floats(run.window)))
    for name, player in run.method.players.items():
        row[f"{name}/lr"] = float(player.optimizer.param_groups[0]["lr"])
    row["nonfinite_skipped"] = run.nonfinite_total
    row["seconds"] = round(run.elapsed, 3)
    if accelerator.device.type == "cuda":  # the number a GPU recipe's memory column is checked against
        row["max_memory_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
    run.window = {}
    run.last_row = row
    if run.replicated:
        _warn_if_out_of_sync(run.method, run.replicated, accelerator, step, run.out_of_sync)
    if run.main:
        append_text(run.metrics_path, json.dumps(row) + "\n")  # an OS error: one line naming the file
        for k, v in row.items():
            if k != "it":
                run.writer.add_scalar(k, v, step)
        if log_fn is not None:
            log_fn(row)


def _sample_due(run: _Run, step: int) -> bool:
    """A sample grid every ``sample_every`` iterations and at the end (main process; FSDP: after training)."""
    cfg = run.cfg
    return run.main and not run.fsdp and (bool(cfg.sample_every and step % cfg.sample_every == 0)
                                          or step == cfg.iterations)


def _checkpoint_due(run: _Run, step: int) -> bool:
    """Every ``checkpoint_every`` iterations, at the end, and once ``checkpoint_minutes`` have passed since the last
    one. The main process's clock decides for every process, so all of them write together: with several processes
    it is asked every :data:`CLOCK_EVERY` iterations (a broadcast and a host sync each time, not every step)."""
    cfg = run.cfg
    if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
        return True
    if cfg.checkpoint_minutes is None or (run.world > 1 and step % CLOCK_EVERY):
        return False
    due = _now() - run.last_checkpoint_time >= 60.0 * cfg.checkpoint_minutes
    if run.world > 1:
        from accelerate.utils import broadcast

        flag = torch.tensor([1.0 if due else 0.0], device=run.accelerator.device)
        due = bool(broadcast(flag, from_process=0).item() > 0.5)
    return due


def _save_checkpoint(run: _Run, step: int) -> None:
    """Write ``checkpoints/step_<step>.pt`` atomically (a collective with sharded players) and prune old ones.

    First the main process checks that the disk has room for it (:func:`_no_room`), before anything is gathered or
    serialised; too little, or a write that fails after all, stops every process with the main process's line."""
    path = checkpoint_path(run.run_dir, step)
    _raise_on_every_process(run, _no_room(run, path) if run.main else None)
    log_state = {"window": _window_floats(run.window), "nonfinite_skipped": run.nonfinite_total,
                 "consecutive_nonfinite": run.consecutive_bad}
    ckpt = _checkpoint(run.method, run.emas, run.accelerator, step, log_state, run.elapsed, run.run_config,
                       run.sharded)
    error = None
    if run.main:
        try:
            _write_checkpoint(ckpt, path)
            _prune_checkpoints(run.run_dir, run.cfg.keep_checkpoints)
            run.writer.flush()
        except UserError as e:  # the disk filled up after all (another writer): atomic_write left nothing behind
            error = str(e)
    _raise_on_every_process(run, error)
    run.accelerator.wait_for_everyone()
    run.last_checkpoint_time = _now()


def _raise_on_every_process(run: _Run, message: str | None) -> None:
    """The main process's one-line error ``message`` (None: none), raised on every process together (a collective
    with several processes), so that none waits for the others forever."""
    if run.world > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message:
        raise UserError(message)


def _checkpoint_bytes(run: _Run) -> int:
    """The next checkpoint's bytes, from the live state (nothing gathered or serialised): each player's module state,
    optimizer state and EMA, and the method's extra state. Before the first update an optimizer has no state yet:
    then AdamW's two moments per held parameter are counted (one for other optimizers). Sharded players count
    their full size (a checkpoint gathers it)."""
    total = tensor_bytes(run.method.extra_state())
    for name, player in run.method.players.items():
        total += tensor_bytes(player.module.state_dict())
        optimizer = getattr(player.optimizer, "optimizer", player.optimizer)  # under Accelerate's wrapper
        if optimizer.state:
            total += tensor_bytes(list(optimizer.state.values()))
        else:
            moments = 2 if "Adam" in type(optimizer).__name__ else 1
            total += moments * tensor_bytes(optimizer_parameters([optimizer]))
        if name in run.emas:
            total += tensor_bytes(run.emas[name].state_dict())
    return total


def _disk_fix(run: _Run) -> str:
    return (f"free some space there, lower loop.keep_checkpoints ({run.cfg.keep_checkpoints} now; a resumed run "
            "removes the older checkpoints beyond it), or move the run folder to a disk with room")


def _no_room(run: _Run, path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be written (main process), or None: it needs its estimated bytes plus the
    margin (:func:`fewstep.io.with_margin`) free, on top of the kept checkpoints (pruned only once it is written)."""
    size = _checkpoint_bytes(run)
    need, free = with_margin(size), free_bytes(path.parent)
    if free >= need:
        return None
    kept = list_checkpoints(run.run_dir)
    last = (f"the last checkpoint, {kept[-1].name}, is intact and --resume continues from it" if kept
            else "no checkpoint was written yet")
    return (f"not enough disk space for checkpoint {path.name} in {path.parent}: it needs {show_bytes(need)} (about "
            f"{show_bytes(size)} and room to spare) and {show_bytes(free)} are free; {_disk_fix(run)}; {last}")


def _check_disk(run: _Run) -> None:
    """Before training: the disk must have room for the run's next checkpoint (else a one-line error on every
    process, nothing trained); a warning when it lacks room for the most the run keeps at once (the newest
    ``keep_checkpoints`` and the one being written, of the checkpoints it writes every ``checkpoint_every``
    iterations and at the end)."""
    cfg = run.cfg
    writes = cfg.iterations // cfg.checkpoint_every - run.start // cfg.checkpoint_every
    writes += int(cfg.iterations > run.start and cfg.iterations % cfg.checkpoint_every != 0)
    error = None
    if run.main and writes > 0:
        folder = checkpoint_path(run.run_dir, 0).parent
        size, free = _checkpoint_bytes(run), free_bytes(folder)
        kept = len(list_checkpoints(run.run_dir))
        most = max(1, min(kept + writes - 1, cfg.keep_checkpoints) + 1 - kept)  # new files on disk at once
        if free < with_margin(size):
            error = (f"{folder} has {show_bytes(free)} free, too little for one checkpoint of this run (about "
                     f"{show_bytes(size)}; {show_bytes(with_margin(size))} with room to spare), so nothing was "
                     f"trained; free some space there or choose another --out (the run needs about "
                     f"{show_bytes(with_margin(most * size))} for its checkpoints)")
        elif free < with_margin(most * size):
            warnings.warn(f"{folder} has {show_bytes(free)} free, less than the {show_bytes(with_margin(most * size))}"
                          f" that the {most} checkpoints of about {show_bytes(size)} this run holds at once need (it "
                          f"keeps the newest {cfg.keep_checkpoints} and writes each new one before removing the "
                          f"oldest); it stops with a one-line error when the next one does not fit (--resume "
                          f"continues) unless you {_disk_fix(run)}",
                          stacklevel=3)
    _raise_on_every_process(run, error)


def _close(run: _Run) -> None:
    """Close the progress bar and TensorBoard; frozen weights back in their own dtype (also after an error)."""
    if run.pbar is not None:
        run.pbar.close()
    if run.writer is not None:
        run.writer.close()
    if run.restore_dtypes is not None:  # evaluation and export run outside autocast
        run.restore_dtypes([e.module for e in run.emas.values()])


def _finish(run: _Run, sample_fn: Callable[[int, Path], None] | None) -> dict[str, Any]:
    """FSDP: gather each sharded player back into a plain module (and write the last grid). The last logged row."""
    if run.fsdp:  # sampling, saving and export after training see plain modules with the full weights everywhere
        for name, skeleton in run.skeletons.items():
            player = run.method.players[name]
            player.optimizer.state.clear()  # training is over (the state is in the last checkpoint): room for the copy
            player.module = gather_player(player.module, skeleton, run.accelerator.device)
            if run.restore_dtypes is not None:  # its frozen parts were copied in the training dtype
                run.restore_dtypes([player.module])
        iterations = run.cfg.iterations
        if sample_fn is not None and run.main and run.start < iterations:
            sample_fn(iterations, run.run_dir / "samples" / f"step_{iterations:08d}.png")
    run.accelerator.wait_for_everyone()
    return run.last_row or {"it": run.start}


def _checkpoint(
    method: Method,
    emas: dict[str, EMA],
    accelerator: Any,
    step: int,
    log_state: dict[str, Any],
    elapsed: float,
    run_config: dict[str, Any],
    sharded: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """The checkpoint's contents; with ``sharded`` players a collective (every process calls it; rank 0 gets it)."""
    players = {}
    for name, p in method.players.items():
        module_state, optimizer_state, fmt = player_state(p.module, p.optimizer, bool(sharded and sharded[name]))
        players[name] = {
            "module": module_state,
            "optimizer": optimizer_state,
            "optimizer_format": fmt,
            "lr_scheduler": None if p.lr_scheduler is None else p.lr_scheduler.state_dict(),
            "ema": emas[name].state_dict() if name in emas else None,
        }
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "iteration": step,
        "players": players,
        "method": method.extra_state(),
        "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
        "rng": _rng_state(),
        "log": log_state,
        "elapsed_seconds": elapsed,
        "config": run_config,
    }


def _restore(method: Method, emas: dict[str, EMA], accelerator: Any, ckpt: dict[str, Any], path: Path,
             sharded: dict[str, bool] | None = None) -> None:
    missing = set(method.players) - set(ckpt["players"])
    if missing:
        raise UserError(f"{path} has no state for player(s) {sorted(missing)}; it belongs to another kind of run")
    try:
        for name, p in method.players.items():
            state = ckpt["players"][name]
            load_player_state(p.module, p.optimizer, state["module"], state["optimizer"],
                              state.get("optimizer_format", "index"), bool(sharded and sharded[name]))
            if p.lr_scheduler is not None and state.get("lr_scheduler") is not None:
                p.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if name in emas:
                if state.get("ema") is None:
                    raise UserError(f"{path} has no EMA state for player {name!r}")
                emas[name].load_state_dict(state["ema"])
    except (RuntimeError, KeyError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} does not match this run's networks ({first}); resume with the config it was made "
                        f"with or choose a new --out") from None
    method.load_extra_state(ckpt.get("method", {}))
    if accelerator.scaler is not None and ckpt.get("scaler") is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        _set_rng_state(ckpt["rng"])  # for completeness: every iteration reseeds anyway
