"""Typed run configs (pydantic v2) and their YAML form (DESIGN.md, style rule 7).

Every config forbids unknown keys, so a typo is an error rather than a silently ignored option. A run directory
always holds the *resolved* config (every default filled in) as ``config.yaml``; :func:`load_config` reads it back.
Validation and YAML errors surface as one-line :class:`~fewstep.errors.UserError` messages such as
``config.yaml: loop.iterations: Input should be greater than or equal to 1 (got 0)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .io import atomic_write_text
from .options import MAX_BATCH_SIZE, MAX_ITERATIONS, MAX_LR, MAX_RESOLUTION, MAX_SEED, MAX_STUDENT_STEPS

M = TypeVar("M", bound=BaseModel)

#: the model_config of every run config: unknown keys are errors, and so are nan and inf in any float field
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoopConfig(BaseModel):
    """Options of the training loop shared by teacher training and every distillation method."""

    model_config = STRICT

    iterations: int = Field(
        1000, ge=1, le=MAX_ITERATIONS,
        description="Training iterations (one batch each; every scheduled player updates).")
    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE, description="Global batch size (split evenly across processes).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random draw; with (rank, iteration) it reseeds every step.")
    checkpoint_every: int = Field(1000, ge=1, description="Write a checkpoint every this many iterations (and at the end).")
    checkpoint_minutes: float | None = Field(
        10.0, gt=0,
        description="Also write one once this many minutes of wall time have passed since the last (None = by "
                    "iterations only), so a crash loses at most that much. Safe to change on resume.")
    keep_checkpoints: int = Field(3, ge=1, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(50, ge=1, description="Log means of the losses over this many iterations to metrics.jsonl/TensorBoard.")
    sample_every: int = Field(
        1000, ge=0, description="Write a sample grid every this many iterations (0 = only at the end)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no",
        description="Accelerate mixed precision: 'no', 'fp16' (GPU only) or 'bf16' (Ampere+ GPUs, CPUs). Losses run "
                    "under autocast and every frozen weight (teacher, LoRA bases) is held in that dtype.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the players' activations in the backward pass (diffusers models, ClassUNet): "
                           "less memory for ~30% more compute.")
    fsdp: bool = Field(
        False,
        description="Shard every player's weights, gradients and optimizer state over the processes (FSDP2 "
                    "fully_shard) instead of replicating them (DDP). Also on when `accelerate launch` runs with "
                    "configs/accelerate_fsdp.yaml. Needs 2+ processes; no EMA; checkpoints gather the full state.")
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

    model_config = STRICT

    data: str = Field("digits", description="Embedded data name (digits, grid25, ...), an image folder or a point file.")
    resolution: int | None = Field(
        None, ge=1, le=MAX_RESOLUTION, description="Image side length (None = the data's own; digits: 8 or 16). Ignored for points."
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
    lr: float = Field(1e-3, gt=0, le=MAX_LR, description="AdamW learning rate (after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    warmup_iterations: int = Field(200, ge=0, description="Linear learning-rate warm-up length.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved teacher (with a 1+s/10+s warm-up).")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None = no clipping).")
    label_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability of replacing a label by the null class (trains CFG's unconditional)."
    )
    loop: LoopConfig = Field(default_factory=_default_teacher_loop, description="Training loop options.")


#: the ``teacher`` field of every method config
TEACHER_DESCRIPTION = ("Embedded teacher name, a run directory from `fewstep teacher train`, or a local diffusers "
                       "folder (a pipeline with model_index.json, or a bare model with config.json and weights).")
#: the ``resolution`` field of the method configs that have it
RESOLUTION_DESCRIPTION = ("Diffusers teachers: the image side to distil at, in pixels (None = the model's own "
                          "sample_size; a multiple of the VAE's and the model's downsampling factors). fewstep's own "
                          "networks have theirs.")


def _default_distill_loop() -> LoopConfig:
    return LoopConfig(iterations=1500, batch_size=64, checkpoint_every=500, log_every=50, sample_every=250)


class DMD2Config(BaseModel):
    """DMD2 (Yin et al. 2024): distribution matching with a fake score at a faster time scale, a GAN head on the
    fake score's bottleneck, and backward simulation for multi-step students. The ablation switches give DMD2 without
    TTUR (``ttur: 1``), without the GAN head (``gan: false``) and DMD v1 (``ttur: 1, gan: false, regression: true``)."""

    model_config = STRICT

    method: Literal["dmd2"] = Field("dmd2", description="The distillation method.")
    teacher: str = Field("digits", description=TEACHER_DESCRIPTION)
    data: str | None = Field(None, description="Real data for the GAN head (default: the teacher's training data).")
    steps: int = Field(1, ge=1, le=MAX_STUDENT_STEPS, description="Student sampling steps (timesteps: trailing spacing, e.g. 999 749 499 249).")
    resolution: int | None = Field(None, ge=1, le=MAX_RESOLUTION, description=RESOLUTION_DESCRIPTION)
    guidance_scale: float = Field(
        1.0, ge=1.0, description="CFG scale on the real score (w = 1: no guidance; uncond + w (cond - uncond)).")
    ttur: int = Field(
        5, ge=1,
        description="Two time-scale update rule, the DMD2 code's convention: the fake score (and GAN head) update every "
                    "iteration and the generator every `ttur`-th one (5 = 4 fake-only iterations, then one where the "
                    "generator updates first and the fake score after it). 1 = no TTUR.")
    gan: bool = Field(True, description="Train the GAN classifier head on the fake score's bottleneck features.")
    gan_head_weight: float = Field(1e-2, ge=0, description="Weight of the head's GAN loss next to the fake score's denoising loss.")
    gan_generator_weight: float = Field(3e-3, ge=0, description="lambda_G: weight of the generator's GAN loss next to L_dm.")
    gan_start_iteration: int = Field(
        0, ge=0,
        description="Loop iteration from which the GAN trains (head loss and lambda_G term; before it: DMD2 without "
                    "GAN). DMD2's SD 1.5 model adds the GAN in a second run resumed from the GAN-free one "
                    "(experiments/sdv1.5/*_resume*.sh); this does it in one run.")
    gan_stage_lr: float | None = Field(
        None, gt=0, le=MAX_LR,
        description="Learning rate of both players from gan_start_iteration on (DMD2's SD 1.5 GAN resume: 5e-7); "
                    "None = lr_generator / lr_fake throughout.")
    regression: bool = Field(False, description="DMD (v1): add an L2 regression loss to teacher ODE pairs.")
    regression_weight: float = Field(0.25, ge=0, description="Weight of the regression loss (DMD v1).")
    regression_pairs: int = Field(1024, ge=1, description="Noise/image pairs precomputed with the teacher's ODE (DMD v1).")
    regression_teacher_steps: int = Field(32, ge=1, description="Heun steps of the teacher when making regression pairs.")
    dm_t_range: tuple[float, float] = Field(
        (0.02, 0.98), description="Share of the time range the distribution matching loss draws t from (DMD2: 2%..98%).")
    lr_generator: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate of the generator.")
    lr_fake: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate of the fake score and GAN head.")
    adam_betas: tuple[float, float] = Field(
        (0.0, 0.999),
        description="AdamW betas (both players). The DMD2 code uses (0.9, 0.999) (main/train_sd.py, PyTorch's "
                    "default); (0, 0.999) is what the digits/grid25 benchmarks ran with (not compared with 0.9).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (DMD2 reference: 0.01).")
    warmup_iterations: int = Field(
        20, ge=0, description="Linear learning-rate warm-up length, counted in warmup_unit.")
    warmup_unit: Literal["updates", "iterations"] = Field(
        "updates",
        description="What warmup_iterations counts: 'updates' of each player (the generator's warm-up then spans "
                    "warmup_iterations x ttur loop iterations; the digits/grid25 benchmarks' setting) or loop "
                    "'iterations' for both players (the DMD2 code steps both schedulers every iteration, "
                    "main/train_sd.py).")
    grad_clip: float | None = Field(10.0, gt=0, description="Max gradient norm (DMD2 reference: 10).")
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="EMA of the generator (None: sample the raw generator, as the DMD2 reference).")
    lora_rank: int | None = Field(
        None, ge=1,
        description="Train the players in lora_players as LoRA adapters of this rank on the frozen teacher "
                    "(fewstep.models.lora; the base weights are the teacher's, held once). None = full fine-tuning. "
                    "The GAN head is trained in full either way.")
    lora_alpha: float | None = Field(
        None, gt=0,
        description="LoRA alpha: the adapters' output is scaled by lora_alpha / lora_rank (None: alpha = rank, scale "
                    "1). DMD2's SDXL LoRA run: rank 64, alpha 8 (main/train_sd.py --lora_rank / --lora_alpha).")
    lora_players: list[Literal["generator", "fake_score"]] = Field(
        ["generator", "fake_score"], min_length=1,
        description="Which players are LoRA adapters when lora_rank is set; the others train in full. DMD2's SDXL "
                    "LoRA run adapts the generator only, with a full fake score (--generator_lora).")
    fake_score: Literal["per_step", "shared"] = Field(
        "per_step",
        description="k-step students: 'per_step' gives the fake score one LoRA adapter per student step (rank "
                    "fake_step_rank) on its trunk: fake_i = trunk + delta_i is trained and evaluated on step-i "
                    "outputs only (each iteration splits the batch over the k steps), and the GAN head scores "
                    "step-i samples on fake_i's features, so every step is matched to the data, not only their "
                    "mixture (issue 16; ours, not in the DMD2 code). 'shared': one fake score for all steps, one "
                    "step drawn per iteration (the DMD2 code, sd_unified_model.py / sd_guidance.py). Identical at "
                    "steps 1.")
    fake_t_distribution: Literal["teacher", "uniform_index"] = Field(
        "teacher",
        description="The noise levels of the fake score's denoising loss, with its weighting. 'teacher': the "
                    "teacher's training distribution (schedule.sample_train_t: DDPM a uniform timestep, as the DMD2 "
                    "SD code; EDM log-normal, median sigma 0.30, 1% above 5) and the teacher's own loss (eps-/v-/F-"
                    "MSE). 'uniform_index': the DMD2 EDM code (main/edm/edm_guidance.py): a uniform index over 1,000 "
                    "Karras sigmas (sigma_min 0.002, sigma_max 80, rho 7, in EDM sigma = sigma_t / alpha_t; median "
                    "2.5, 42% above 5; a DDPM teacher takes the nearest timestep), the x0 error weighted by EDM's "
                    "1/sigma^2 + 1/sigma_data^2 (sigma_data: the schedule's, else 0.5).")
    fake_step_rank: int = Field(
        16, ge=1,
        description="Rank of the per-step adapters of fake_score: per_step (alpha = rank; on every Linear and "
                    "Conv2d of the fake score, as lora_rank). Ours: 16 (SDXL, 4 steps: 3.2 GB; "
                    "benchmarks/memory_budget.py).")
    loop: LoopConfig = Field(default_factory=_default_distill_loop, description="Training loop options.")


# ----------------------------------------------------------------------------------------------------------------
# YAML in and out
# ----------------------------------------------------------------------------------------------------------------
def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``source: loc.a.b: message (got value); loc.c: message`` (the value when it is a number or a short
    string)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        value = e.get("input")
        shown = isinstance(value, (int, float, str)) and len(repr(value)) <= 40 and e.get("type") != "missing"
        parts.append(f"{loc}: {e.get('msg', 'invalid value')}{f' (got {value!r})' if shown else ''}")
    return " ".join(f"{source}: {'; '.join(parts)}".split())  # one line, whatever the messages hold


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
    "DMD2Config",
    "TEACHER_DESCRIPTION",
    "RESOLUTION_DESCRIPTION",
    "load_config",
    "dump_config",
    "validate_config",
    "format_validation_error",
]
