"""The embedded teachers and feature network that ship with fewstep, and the commands that rebuild them.

Each teacher is ``<name>.safetensors`` + ``<name>.json`` in this folder, written by ``fewstep zoo build <name>``:
the same code path as ``fewstep teacher train`` with the preset below, so anyone can reproduce the shipped file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json
from ..options import CLASSIFIER, TEACHERS

ZOO_DIR = Path(__file__).resolve().parent

# Training presets of the embedded teachers (TeacherConfig fields). Digits: the class-conditional UNet (null class for
# CFG); toys: the residual MLP. Both: DDPM T=1000, linear betas rescaled to zero terminal SNR, v-prediction, trailing
# spacing (Lin et al. 2024), so that t = 999 is pure noise and a one-step student starts from exactly N(0, I).
_SCHEDULE = {"kind": "ddpm", "beta_schedule": "linear", "rescale_zero_terminal_snr": True, "timestep_spacing": "trailing"}
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": "digits",
        "schedule": _SCHEDULE,
        "prediction_type": "v_prediction",
        "lr": 1e-3,
        "ema_decay": 0.999,
        "loop": {"iterations": 8000, "batch_size": 128, "seed": 0, "checkpoint_every": 1000, "log_every": 50,
                 "sample_every": 2000},
    },
    **{
        toy: {
            "data": toy,
            "schedule": _SCHEDULE,
            "prediction_type": "v_prediction",
            "lr": 1e-3,
            "ema_decay": 0.999,
            "network": {"type": "mlp", "width": 256, "depth": 4},
            "loop": {"iterations": 15000, "batch_size": 512, "seed": 0, "checkpoint_every": 5000, "log_every": 50,
                     "sample_every": 5000},
        }
        for toy in TEACHERS[1:]
    },
    # the text-to-image teacher: a diffusers UNet2DConditionModel on all-MiniLM-L6-v2's token embeddings (a
    # StableDiffusionPipeline without a VAE; fewstep.models.text_unet), caption dropout 0.1 to the empty prompt
    "shapes": {
        "data": "shapes",
        "schedule": _SCHEDULE,
        "prediction_type": "v_prediction",
        "lr": 1e-3,
        "ema_decay": 0.999,
        "network": {"type": "unet2d_condition", "block_out_channels": [32, 64]},
        "loop": {"iterations": 3000, "batch_size": 64, "seed": 0, "checkpoint_every": 500, "log_every": 50,
                 "sample_every": 1000},
    },
}


def build_command(name: str) -> str:
    return f"fewstep zoo build {name}"


def zoo_path(name: str) -> Path:
    """The path prefix of a shipped file (``.safetensors`` and ``.json`` beside each other)."""
    return ZOO_DIR / name


def require(name: str) -> Path:
    """``zoo_path(name)``, or a clear error naming the command that builds it."""
    prefix = zoo_path(name)
    if not prefix.with_suffix(".safetensors").is_file() or not prefix.with_suffix(".json").is_file():
        raise UserError(f"embedded weights {prefix}.safetensors are missing; rebuild them with `{build_command(name)}`")
    return prefix


def build_teacher(name: str, work_dir: Path, resume: bool = False) -> Path:
    """Train the embedded teacher ``name`` from its preset in ``work_dir`` and copy the result into the zoo."""
    from ..config import TeacherConfig
    from ..train.teacher import teacher_sample_writer, train_teacher

    if name not in PRESETS:
        raise UserError(f"unknown embedded teacher {name!r}; choose from {', '.join(TEACHERS)}")
    cfg = TeacherConfig.model_validate(PRESETS[name])
    model = train_teacher(cfg, work_dir, resume=resume, sample_fn=teacher_sample_writer(cfg.data))
    desc = json.loads(model.with_suffix(".json").read_text())
    desc["meta"]["command"] = build_command(name)
    atomic_write_bytes(zoo_path(name).with_suffix(".safetensors"), model.with_suffix(".safetensors").read_bytes())
    atomic_write_json(zoo_path(name).with_suffix(".json"), desc)
    return zoo_path(name)
