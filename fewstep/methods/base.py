"""What a training method is: players, an update schedule, and a loss per player (DESIGN.md, style rule 2).

A *method* is a loss object, not a trainer. It declares its **players** (the networks it trains, each with its own
optimizer), says which players update at iteration ``it`` and in what order (this is where DMD2's two time-scale
update rule lives), and computes a scalar loss plus a stats dict for one player at a time. The loop in
:mod:`fewstep.train.loop` draws the batch, reseeds the RNGs, calls ``loss``, ``backward`` and ``step``, keeps the EMA,
logs, checkpoints and resumes. Teacher training is the one-player method :class:`fewstep.train.teacher.TeacherMethod`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def _to(v: Any, device: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v.to(device)


@dataclass
class Batch:
    """One training batch: data ``x0`` (images in [-1, 1], latents or points), optional class ``labels`` (or, for a
    text-to-image teacher, caption indices into its prompt bank) and an optional explicit condition ``cond`` (a tensor
    or a dict of tensors, e.g. prompt embeddings), which takes precedence over ``labels``."""

    x0: Tensor
    labels: Tensor | None = None
    cond: Any = None

    def to(self, device: Any) -> "Batch":
        return Batch(self.x0.to(device), _to(self.labels, device), _to(self.cond, device))


def is_conditional(teacher: Any) -> bool:
    """Whether ``teacher`` takes a condition: class labels or prompt embeddings."""
    return getattr(teacher, "num_classes", 0) > 0 or bool(getattr(teacher, "text_conditional", False))


def batch_cond(batch: Batch, teacher: Any) -> Any:
    """The condition a method passes to its denoisers for ``batch`` (every method routes it through here):
    ``batch.cond`` when given; else the class labels for a class-conditional teacher; else, for a text-to-image
    teacher, the prompt embeddings of the caption indices in ``batch.labels``; else None (unconditional)."""
    if batch.cond is not None:
        return batch.cond
    if batch.labels is None:
        return None
    if getattr(teacher, "num_classes", 0) > 0:
        return batch.labels
    if getattr(teacher, "text_conditional", False):
        return teacher.prompt_lookup(batch.labels)
    return None


@dataclass
class Player:
    """A trained network with its optimizer and options.

    Args:
        module: the trained ``nn.Module`` (the loop wraps it with Accelerate; the method must read it back from
            ``player.module`` after preparation).
        optimizer: its optimizer.
        lr_scheduler: optional LR scheduler, stepped after every update of this player.
        grad_clip: max gradient norm (None = no clipping).
        ema_decay: keep an EMA copy of ``module`` with this decay (None = no EMA).
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any = None
    grad_clip: float | None = None
    ema_decay: float | None = None
    ema: nn.Module | None = field(default=None, repr=False)


class Method:
    """Base class of every training method (teacher training and every distillation method)."""

    #: players by name, in the order they are saved
    players: dict[str, Player]
    #: the run directory, set by the loop before :meth:`to` (methods that store artefacts there read it)
    run_dir: "Path | None" = None
    #: the training data (``x``, ``labels``), set by the loop before :meth:`to` (DisBack's recording of the GAN head
    #: reads its real samples)
    dataset: Any = None

    def updates(self, it: int) -> list[str]:
        """The players that take an optimizer step at iteration ``it``, in order (default: all, every iteration)."""
        return list(self.players)

    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss to minimise for ``player`` on ``batch`` at iteration ``it``, and stats to log."""
        raise NotImplementedError

    def inference_model(self) -> nn.Module:
        """The network used for sampling and evaluation (an EMA copy when there is one)."""
        raise NotImplementedError

    def to(self, device: Any) -> "Method":
        """Move what the method holds besides its players (frozen teachers, precomputed tensors) to ``device``;
        the loop calls it once Accelerate has chosen the device."""
        return self

    def extra_state(self) -> dict[str, Any]:
        """State other than the players' (saved in checkpoints); tensors and plain Python values only."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear learning-rate warm-up over ``warmup_iterations`` updates, then constant."""
    w = max(int(warmup_iterations), 0)

    def factor(step: int) -> float:
        return 1.0 if w == 0 else min(1.0, (step + 1) / w)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
