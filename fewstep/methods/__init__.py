"""The distillation methods: each name maps to its typed config and its :class:`~fewstep.methods.base.Method`.

A method class is built as ``Method(teacher, cfg)`` (with ``teacher`` a frozen :class:`Denoiser` and ``cfg`` its
config), exposes ``timesteps`` (the student's input times) and ``inference_model()`` (the generator denoiser).
"""
from __future__ import annotations

from typing import Any


def registry() -> dict[str, tuple[type, Any]]:
    """``{name: (config class, method class)}``; imported lazily so that ``fewstep --help`` stays fast."""
    from ..config import DMD2Config
    from .add import ADDConfig, ADDMethod
    from .disback import DisBackConfig, DisBackMethod
    from .dmd2 import DMD2Method
    from .lightning import LightningConfig, LightningMethod

    return {"dmd2": (DMD2Config, DMD2Method), "add": (ADDConfig, ADDMethod), "disback": (DisBackConfig, DisBackMethod),
            "lightning": (LightningConfig, LightningMethod)}


METHOD_NAMES = ("dmd2", "add", "disback", "lightning")
