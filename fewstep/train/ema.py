"""Exponential moving average of a module's weights (the network a run saves and samples with)."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """An EMA copy of ``module``: ``ema <- d ema + (1 - d) param`` with ``d = min(decay, (1 + step) / (10 + step))``.

    The warm-up (as in TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps the copy close to the
    trained weights early on, when the initialisation is still in a full-decay average. Buffers are copied as is.
    Frozen parameters (``requires_grad=False``: a LoRA player's base weights) are not copied but shared with
    ``module``: they never change, and an SDXL-sized base is not held twice.

    Args:
        module: the module to follow (an unwrapped one: pass ``accelerator.unwrap_model(module)``).
        decay: the long-run decay.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        memo = {id(p): p for p in module.parameters() if not p.requires_grad}  # shared, not copied
        self.module = copy.deepcopy(module, memo).eval()
        for p in self.module.parameters():
            if id(p) not in memo:
                p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the average towards ``module``'s current weights (``step`` drives the warm-up)."""
        d = self.decay_at(step)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        assert len(ema_params) == len(params), "EMA and module have different parameters"
        for e, p in zip(ema_params, params):
            if e is not p:  # shared frozen weights
                e.lerp_(p.to(e.dtype), 1.0 - d)
        for e, b in zip(self.module.buffers(), module.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.module.load_state_dict(state["module"])

    def to(self, device: Any) -> "EMA":
        self.module.to(device)
        return self
