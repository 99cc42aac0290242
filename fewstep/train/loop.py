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
* **checkpoints** -- ``checkpoints/step_XXXXXXXX.pt`` (``XXXXXXXX`` = iterations done), written atomically, the newest
  ``keep_checkpoints`` kept; tensors and plain values only, loaded back with ``torch.load(weights_only=True)``;
* **resume** -- from the newest checkpoint that loads (a corrupt one falls back to the one before, with a warning).

Steps are counted in *iterations done*: the checkpoint, the log row and the sample grid written after iteration
``it`` (0-based) all carry ``step = it + 1``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel

from ..config import LoopConfig, dump_config
from ..errors import UserError
from ..io import atomic_torch_save, atomic_write_text
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
MAX_CONSECUTIVE_NONFINITE = 10
_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")


# ----------------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------------
def step_seed(seed: int, rank: int, it: int, stream: int = 0) -> int:
    """A 63-bit seed mixed from ``(seed, rank, it, stream)`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, rank, it, stream]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def set_random_seed(seed: int, rank: int, it: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and ``random`` for iteration ``it`` on process ``rank``."""
    s = step_seed(seed, rank, it)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)


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
def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """A run directory is never overwritten: without ``resume`` it must be new or empty."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; choose a new --out")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists; pass --resume to continue it or choose a new --out")


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


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads cleanly, falling back past corrupt or truncated ones with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a truncated zip, a bad pickle, a foreign file: all mean "not usable"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"skipping checkpoint {path} that does not load ({msg}); trying the one before", stacklevel=2)
    return None


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
    rows = [r for r in read_metrics(path) if isinstance(r.get("it"), int) and r["it"] <= step]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _remove_temporaries(run_dir: Path) -> None:
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp"):
            p.unlink(missing_ok=True)


def _prune_checkpoints(run_dir: Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
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
# The loop
# ----------------------------------------------------------------------------------------------------------------
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
        resume: continue from the newest checkpoint in ``run_dir`` (start fresh when there is none).
        sample_fn: ``sample_fn(step, path)`` writes a sample grid to ``path``; called every ``cfg.sample_every``
            iterations and at the end, on the main process only.
        log_fn: called with every row written to ``metrics.jsonl`` (main process only).
        config: the run's complete, resolved config: written to ``run_dir/config.yaml`` and kept in checkpoints.

    Returns:
        The last logged row: ``it``, ``<player>/loss``, ``<player>/<stat>``, ``<player>/lr``, ``nonfinite_skipped``,
        ``seconds`` (and, on a GPU, ``max_memory_gb``: this process's peak allocated memory so far).
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    accelerator = make_accelerator(cfg.mixed_precision)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    accelerator.wait_for_everyone()  # every process has checked the directory before the first write

    x = dataset.x
    labels = getattr(dataset, "labels", None)
    n = int(x.shape[0])
    if n == 0:
        raise UserError("the training data is empty")
    if cfg.batch_size % world:
        raise UserError(f"batch_size {cfg.batch_size} does not split evenly across {world} processes")

    # FSDP: from an `accelerate launch` FSDP config or loop.fsdp; either way fewstep shards the players itself
    # (shard_player) so that the methods run unchanged, and Accelerate only provides the processes.
    fsdp = _is_fsdp(accelerator) or (cfg.fsdp and world > 1)
    if cfg.fsdp and world == 1:
        warnings.warn("loop.fsdp with one process: nothing to shard; training unsharded", stacklevel=2)
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
    method.to(accelerator.device)  # frozen teachers and precomputed tensors (DisBack records its path here)
    # Frozen weights in the training dtype (players' frozen parts too: LoRA bases), before the EMA copies.
    low = training_dtype(cfg.mixed_precision, accelerator.device)
    restore_dtypes = None
    if low is not None:
        held = optimizer_parameters(p.optimizer for p in method.players.values())
        restore_dtypes = cast_frozen_parameters(modules_of(method), low, keep=held)
    if cfg.gradient_checkpointing:
        if not sum(enable_gradient_checkpointing(p.module) for p in method.players.values()):
            warnings.warn("gradient_checkpointing: none of the players' networks supports it; training without",
                          stacklevel=2)

    # Players: EMA copies are taken before Accelerate wraps the modules (and patches forward for autocast).
    emas: dict[str, EMA] = {}
    skeletons: dict[str, torch.nn.Module] = {}
    # FSDP shards the large players; one with under 10% of the largest one's parameters (ADD's heads, whose R1
    # penalty differentiates twice, which FSDP cannot) stays replicated, its gradients averaged like DDP's.
    sizes = {key: sum(q.numel() for q in p.module.parameters() if q.requires_grad) for key, p in method.players.items()}
    to_shard = {key for key, size in sizes.items() if fsdp and size >= 0.1 * max(sizes.values())}
    for name, player in method.players.items():
        if player.ema_decay is not None:
            emas[name] = EMA(player.module, player.ema_decay)
        if name in to_shard:
            skeletons[name] = copy.deepcopy(player.module).to("meta")  # to hand back a plain module after training
            player.module = shard_player(player.module.to(accelerator.device), player.optimizer, low)
        elif fsdp:  # replicated beside sharded players: not given to Accelerate, which would shard it
            player.module = player.module.to(accelerator.device)
        else:
            player.module, player.optimizer = accelerator.prepare(player.module, player.optimizer)
        if name in emas:
            emas[name].to(accelerator.device)
            player.ema = emas[name].module
    sharded = {key: is_sharded_module(p.module) for key, p in method.players.items()}
    # Unsharded multi-process runs average gradients after backward instead of in DDP's backward hooks, so a method
    # may use a player's parameters outside its forward, several times in one backward, or freeze and unfreeze them
    # between phases (Lightning) -- all of which DDP's reducer refuses. (FSDP reduces in its own backward.)
    manual_sync = world > 1 and not any(sharded.values())
    replicated = [key for key in method.players if world > 1 and not sharded[key]]
    out_of_sync: set[str] = set()  # players already warned about

    # State that checkpoints carry besides the players.
    start, elapsed_before, nonfinite_total, consecutive_bad = 0, 0.0, 0, 0
    window: dict[str, list[float]] = {}  # key -> [sum, count] since the last log row
    metrics_path = run_dir / "metrics.jsonl"
    last_row: dict[str, Any] = {}

    if resume:
        found = latest_checkpoint(run_dir)
        if found is not None:
            path, ckpt = found
            _restore(method, emas, accelerator, ckpt, path, sharded)
            start = int(ckpt["iteration"])
            if start > cfg.iterations:
                raise UserError(f"{path} is at iteration {start}, past the {cfg.iterations} iterations asked for; "
                                f"pass --iterations {start} or more to continue this run")
            log = ckpt.get("log", {})
            elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
            nonfinite_total = int(log.get("nonfinite_skipped", 0))
            consecutive_bad = int(log.get("consecutive_nonfinite", 0))
            window = {k: [float(v[0]), float(v[1])] for k, v in log.get("window", {}).items()}
        accelerator.wait_for_everyone()
        if main:
            _remove_temporaries(run_dir)
            rows = _truncate_metrics(metrics_path, start)
            last_row = rows[-1] if rows else {}

    writer = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            dump_config(config, run_dir / "config.yaml")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if resume else None)
    run_config = (config if config is not None else cfg).model_dump(mode="json")

    from tqdm.auto import tqdm

    pbar = tqdm(total=cfg.iterations, initial=start, disable=not (cfg.progress and main), dynamic_ncols=True,
                desc=run_dir.name, unit="it")
    crash_at = int(os.environ[CRASH_ENV]) if os.environ.get(CRASH_ENV) else None
    latest_loss: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for it in range(start, cfg.iterations):
            step = it + 1
            # --- the draws of this iteration: a function of (seed, rank, it) only -----------------------------
            set_random_seed(cfg.seed, rank, it)
            idx = batch_indices(n, cfg.batch_size, cfg.seed, it, rank, world)
            batch = Batch(x[idx], None if labels is None else labels[idx]).to(accelerator.device)

            # --- one update per scheduled player ---------------------------------------------------------------
            for name in method.updates(it):
                player = method.players[name]
                with contextlib.ExitStack() as no_sync:
                    if manual_sync:  # DDP's hooks off for every player: gradients are averaged below
                        for other in method.players.values():
                            no_sync.enter_context(accelerator.no_sync(other.module))
                    with accelerator.autocast():
                        loss, stats = method.loss(name, batch, it)
                    loss_value = _to_float(loss)
                    ok = _all_processes_agree(accelerator, math.isfinite(loss_value))
                    if ok:
                        accelerator.backward(loss)
                if ok:
                    if name in replicated:
                        average_gradients(player.module, accelerator.device)
                    if player.grad_clip is not None:
                        norm = _to_float(accelerator.clip_grad_norm_(player.module.parameters(), player.grad_clip))
                        # with fp16 an inf norm is the grad scaler's business (it skips the step itself)
                        if not math.isfinite(norm) and accelerator.scaler is None:
                            ok = False
                if ok:
                    player.optimizer.step()
                    if player.lr_scheduler is not None:
                        player.lr_scheduler.step()
                    if name in emas:
                        emas[name].update(accelerator.unwrap_model(player.module), it)
                    consecutive_bad = 0
                    latest_loss[name] = loss_value
                    for key, value in {"loss": loss_value, **stats}.items():
                        acc = window.setdefault(f"{name}/{key}", [0.0, 0.0])
                        acc[0] += _to_float(value)
                        acc[1] += 1.0
                else:
                    nonfinite_total += 1
                    consecutive_bad += 1
                    warnings.warn(f"iteration {it}: non-finite loss or gradient for {name!r}; update skipped",
                                  stacklevel=2)
                # every player's gradients: one player's loss may backpropagate into another's network (DMD2's
                # generator loss runs through the fake score's encoder), and those must not leak into its next step
                for other in method.players.values():
                    other.optimizer.zero_grad(set_to_none=True)
                if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
                    raise UserError(
                        f"training diverged: {consecutive_bad} non-finite losses in a row at iteration {it}; "
                        f"lower the learning rate (or enable gradient clipping)"
                    )

            elapsed = elapsed_before + time.perf_counter() - t0
            if latest_loss:
                pbar.set_postfix({k: f"{v:.4g}" for k, v in latest_loss.items()}, refresh=False)
            pbar.update(1)

            # --- log ------------------------------------------------------------------------------------------
            if step % cfg.log_every == 0 or step == cfg.iterations:
                row: dict[str, Any] = {"it": step}
                row.update(_window_means(accelerator, window))
                for name, player in method.players.items():
                    row[f"{name}/lr"] = float(player.optimizer.param_groups[0]["lr"])
                row["nonfinite_skipped"] = nonfinite_total
                row["seconds"] = round(elapsed, 3)
                if accelerator.device.type == "cuda":  # the number a GPU recipe's memory column is checked against
                    row["max_memory_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
                window = {}
                last_row = row
                if replicated:
                    _warn_if_out_of_sync(method, replicated, accelerator, step, out_of_sync)
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    for k, v in row.items():
                        if k not in ("it",):
                            writer.add_scalar(k, v, step)
                    if log_fn is not None:
                        log_fn(row)

            # --- samples --------------------------------------------------------------------------------------
            if sample_fn is not None and main and not fsdp and (  # FSDP: one grid, after training (below)
                (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.iterations
            ):
                with accelerator.autocast():  # frozen parts may be held in the training dtype
                    sample_fn(step, run_dir / "samples" / f"step_{step:08d}.png")

            # --- checkpoint -----------------------------------------------------------------------------------
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                log_state = {"window": window, "nonfinite_skipped": nonfinite_total,
                             "consecutive_nonfinite": consecutive_bad}
                ckpt = _checkpoint(method, emas, accelerator, step, log_state, elapsed, run_config, sharded)
                if main:
                    atomic_torch_save(ckpt, checkpoint_path(run_dir, step))
                    _prune_checkpoints(run_dir, cfg.keep_checkpoints)
                    writer.flush()
                accelerator.wait_for_everyone()
            if crash_at is not None and step == crash_at:
                os._exit(137)  # the test hook: die like kill -9, no cleanup, no flush
    finally:
        pbar.close()
        if writer is not None:
            writer.close()
        if restore_dtypes is not None:  # evaluation and export run outside autocast
            restore_dtypes([e.module for e in emas.values()])
    if fsdp:  # sampling, saving and export after training see plain modules with the full weights, on every process
        for name in skeletons:
            player = method.players[name]
            player.optimizer.state.clear()  # training is over (the state is in the last checkpoint): room for the copy
            player.module = gather_player(player.module, skeletons[name], accelerator.device)
            if restore_dtypes is not None:  # its frozen parts were copied in the training dtype
                restore_dtypes([player.module])
        if sample_fn is not None and main and start < cfg.iterations:
            sample_fn(cfg.iterations, run_dir / "samples" / f"step_{cfg.iterations:08d}.png")
    accelerator.wait_for_everyone()
    if not last_row:
        last_row = {"it": start}
    return last_row


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
