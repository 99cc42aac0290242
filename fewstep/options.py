"""Names, limits and the checks of plain numbers, shared by the command line, the configs and the API.

This module imports no torch (nor anything heavy), so that building the parser (``fewstep --help``) stays fast; the
modules that implement these names import them from here rather than keeping copies, and the command line's argument
types and the API run the same checks.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import UserError

SAMPLERS = ("ddim", "euler", "heun")  # teacher samplers (fewstep.diffusion.samplers)
EXPORT_FORMATS = ("diffusers", "lora")  # fewstep.export
TEACHERS = ("digits", "ring8", "grid25", "moons", "checkerboard", "swissroll")  # shipped teachers (fewstep.zoo)
CLASSIFIER = "digits_classifier"  # the shipped feature network (fewstep.zoo)

MAX_STUDENT_STEPS = 8  # few-step students: 1..8 steps
MAX_CONTINUOUS_STEPS = 10_000  # teacher sampling on a schedule without discrete timesteps (EDM)
MAX_ITERATIONS = 10**9  # training iterations; more is a typo (1e9 iterations of the smallest model take years)
MAX_BATCH_SIZE = 2**20  # samples per training batch
MAX_LR = 1.0  # learning rates: AdamW diverges well below 1
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_RESOLUTION = 16_384  # image side in pixels (SDXL's native side is 1024)


def whole_number(value: Any, flag: str, least: int = 1, most: int | None = None) -> int:
    """``value`` as an int in ``least..most``, else a one-line :class:`UserError` naming ``flag``, the value and
    the range."""
    try:
        whole = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):  # a string, nan, inf
        whole = False
    if not whole:
        raise UserError(f"{flag} must be a whole number, got {value!r}")
    if value < least or (most is not None and value > most):
        allowed = f"at least {least}" if most is None else f"from {least} to {most}"
        raise UserError(f"{flag} must be {allowed}, got {int(value)}")
    return int(value)


def check_seed(seed: Any, flag: str = "--seed") -> int:
    """``seed`` as an int in ``0..MAX_SEED`` (torch's generators take 64-bit seeds)."""
    return whole_number(seed, flag, 0, MAX_SEED)


def check_cfg_scale(scale: Any, flag: str = "--cfg-scale") -> float:
    """``scale`` as a float, finite and at least 0 (0 = unconditional, 1 = no guidance); else a one-line error."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(scale, bool) or not math.isfinite(value) or value < 0:
        raise UserError(f"{flag} must be a finite number of at least 0 (1 = no guidance), got {scale!r}")
    return value
