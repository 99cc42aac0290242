"""Typed run configs (pydantic v2) and their YAML form (DESIGN.md, style rule 7).

Every config forbids unknown keys, so a typo is an error rather than a silently ignored option. A run directory
always holds the *resolved* config (every default filled in) as ``config.yaml``; :func:`load_config` reads it back.
Validation and YAML errors surface as one-line :class:`~fewstep.errors.UserError` messages such as
``config.yaml: loop.iterations: Input should be greater than or equal to 1``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .io import atomic_write_text

M = TypeVar("M", bound=BaseModel)


class LoopConfig(BaseModel):
    """Options of the training loop shared by teacher training and every distillation method."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1000, ge=1, description="Training iterations (one batch each; every scheduled player updates).")
    batch_size: int = Field(128, ge=1, description="Global batch size (split evenly across processes).")
    seed: int = Field(0, ge=0, description="Seed of every random draw; with (rank, iteration) it reseeds every step.")
    checkpoint_every: int = Field(1000, ge=1, description="Write a checkpoint every this many iterations (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(50, ge=1, description="Log means of the losses over this many iterations to metrics.jsonl/TensorBoard.")
    sample_every: int = Field(
        1000, ge=0, description="Write a sample grid every this many iterations (0 = only at the end)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Accelerate mixed precision: 'no', 'fp16' (GPU only) or 'bf16'."
    )
    progress: bool = Field(True, description="Show a progress bar with the losses and the ETA.")


def _default_schedule() -> dict[str, Any]:
    return {
        "kind": "ddpm",
        "beta_schedule": "linear",
        "rescale_zero_terminal_snr": True,
        "timestep_spacing": "trailing",
    }


def _default_teacher_loop() -> LoopConfig:
    return LoopConfig(iterations=4000, batch_size=128, checkpoint_every=1000, log_every=50, sample_every=1000)


class TeacherConfig(BaseModel):
    """Training a diffusion teacher from scratch on embedded data, an image folder or a point file."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("digits", description="Embedded data name (digits, grid25, ...), an image folder or a point file.")
    resolution: int | None = Field(
        None, ge=1, description="Image side length (None = the data's own; digits: 8 or 16). Ignored for points."
    )
    network: dict[str, Any] | None = Field(
        None,
        description=(
            "Network spec {'type': 'unet'|'mlp', ...}; None = the default for the data kind. Missing data-derived "
            "keys (in_channels, resolution, num_classes, dim) are filled in from the data."
        ),
    )
    schedule: dict[str, Any] = Field(
        default_factory=_default_schedule, description="Noise schedule config (fewstep.diffusion.schedule_from_config)."
    )
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow", "edm"] = Field(
        "v_prediction", description="What the network predicts."
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    warmup_iterations: int = Field(200, ge=0, description="Linear learning-rate warm-up length.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved teacher (with a 1+s/10+s warm-up).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None = no clipping).")
    label_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability of replacing a label by the null class (trains CFG's unconditional)."
    )
    loop: LoopConfig = Field(default_factory=_default_teacher_loop, description="Training loop options.")


# ----------------------------------------------------------------------------------------------------------------
# YAML in and out
# ----------------------------------------------------------------------------------------------------------------
def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: loc.a.b: message; loc.c: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        parts.append(f"{loc}: {e.get('msg', 'invalid value')}")
    return f"{source}: " + "; ".join(parts)


def validate_config(model_cls: type[M], data: Any, source: str = "config") -> M:
    """``model_cls.model_validate(data)`` with errors as a one-line :class:`UserError` naming ``source``."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, source)) from None


def load_config(path: str | Path, model_cls: type[M]) -> M:
    """Read a YAML file into ``model_cls``; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read config ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a YAML mapping of option: value, not a {type(data).__name__}")
    return validate_config(model_cls, data, str(path))


def dump_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write ``cfg`` (every field, defaults included) as YAML, atomically."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
    return atomic_write_text(path, text)


__all__ = [
    "LoopConfig",
    "TeacherConfig",
    "load_config",
    "dump_config",
    "validate_config",
    "format_validation_error",
]
