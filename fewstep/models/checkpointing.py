"""Gradient checkpointing on any network fewstep trains (in ``models/``, below the methods and the loop, so that
both the training loop's players and DisBack's degradation recording use it)."""
from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Turn on activation recomputation in every network inside ``module`` that supports it: diffusers models
    (``ModelMixin.enable_gradient_checkpointing``, where ``_supports_gradient_checkpointing``), our ClassUNet (same
    method name) and transformers models (``gradient_checkpointing_enable``). Returns how many were enabled."""
    enabled: list[nn.Module] = []
    for m in module.modules():
        if any(m is e or _is_descendant(m, e) for e in enabled):
            continue
        if getattr(m, "_supports_gradient_checkpointing", True) is False:
            continue
        fn = getattr(m, "enable_gradient_checkpointing", None) or getattr(m, "gradient_checkpointing_enable", None)
        if callable(fn):
            try:
                fn()
            except (ValueError, NotImplementedError):
                continue  # a diffusers/transformers model that does not support it
            enabled.append(m)
    return len(enabled)


def _is_descendant(m: nn.Module, ancestor: nn.Module) -> bool:
    return any(m is d for d in ancestor.modules())


__all__ = ["enable_gradient_checkpointing"]
