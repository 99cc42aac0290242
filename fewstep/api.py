"""The Python API; the CLI is a thin layer over these functions.

    teacher = fewstep.load_teacher("digits")
    x, labels = fewstep.sample(teacher, 64, steps=32, sampler="heun")
    metrics = fewstep.evaluate(teacher, data="digits", steps=4)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import zoo
from .diffusion.denoiser import Denoiser, guided
from .diffusion.samplers import SAMPLERS, nfe, sample as run_sampler
from .errors import UserError
from .models import load_denoiser

#: teacher sampling defaults when a caller gives none
DEFAULT_SAMPLER = "heun"
DEFAULT_STEPS = 32


def load_teacher(spec: str | Path, resolution: int | None = None, dtype: torch.dtype | None = None) -> Denoiser:
    """Load a teacher denoiser.

    Args:
        spec: an embedded name (``digits``, ``ring8``, ``grid25``, ``moons``, ``checkerboard``, ``swissroll``), a run
            directory written by ``fewstep teacher train``, the path of a saved ``.safetensors``/``.json`` pair, or
            a local diffusers folder (a pipeline with ``model_index.json`` or a bare model; see
            :mod:`fewstep.models.hf`).
        resolution: diffusers folders only: the image side to work at (default: the model's own).
        dtype: diffusers folders only: the dtype to load the model and its text encoders and VAE in (default
            float32).

    Returns:
        The denoiser in eval mode without gradients; its saved description is in ``.info``.
    """
    spec_s = str(spec)
    path = Path(spec_s)
    if spec_s in zoo.TEACHERS:
        prefix = zoo.require(spec_s)
    elif path.is_dir() and (path / "model.json").is_file():
        prefix = path / "model"
    elif path.suffix in (".json", ".safetensors") and path.is_file():
        prefix = path.with_suffix("")
    elif path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        from .models.hf import load_diffusers

        return load_diffusers(path, dtype=dtype or torch.float32, resolution=resolution)
    else:
        raise UserError(
            f"no teacher at {spec_s!r}: give an embedded name ({', '.join(zoo.TEACHERS)}), "
            "a run directory from `fewstep teacher train`, a .safetensors file with its .json, or a diffusers folder"
        )
    if resolution is not None or dtype is not None:
        raise UserError("resolution and dtype are options of diffusers teachers; fewstep's own networks have theirs")
    den, desc = load_denoiser(prefix)
    den.info = desc
    return den


def load_model(spec: str | Path) -> Any:
    """A teacher (as :func:`load_teacher`) or a distilled student: a ``fewstep distill`` run directory or its
    ``student.safetensors``/``.json``."""
    from .student import load_student

    path = Path(str(spec))
    if path.is_dir() and (path / "student.json").is_file():
        return load_student(path / "student")
    if path.suffix in (".json", ".safetensors") and path.is_file():
        import json

        try:
            kind = json.loads(path.with_suffix(".json").read_text()).get("meta", {}).get("kind")
        except (OSError, json.JSONDecodeError):
            kind = None
        if kind == "student":
            return load_student(path.with_suffix(""))
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "model.json").is_file():
        raise UserError(f"{path} holds no finished model yet; finish the run with --resume")
    return load_teacher(spec)


def model_data(model: Any) -> str | None:
    """The data a model was trained on, from its saved description."""
    return getattr(model, "info", {}).get("meta", {}).get("data")


def _labels_for(model: Any, n: int, labels: Tensor | list[int] | None) -> Tensor | None:
    num_classes = getattr(model, "num_classes", 0)
    if num_classes == 0:
        if labels is not None:
            raise UserError("this model is unconditional; do not pass labels")
        return None
    if labels is None:
        return torch.arange(n) % num_classes  # balanced classes
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 1 or len(labels) != n:
        raise UserError(f"labels must be a list of {n} class indices, got shape {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must lie in 0..{num_classes - 1}")
    return labels


def check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise UserError(f"--steps must be a whole number of at least 1, got {steps}")
    return int(steps)


@torch.no_grad()
def generate(
    model: Denoiser,
    n: int,
    steps: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    labels: Tensor | list[int] | None = None,
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 1000,
) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """Sample ``n`` items from a teacher or a student; returns samples, labels and timing stats (``nfe``,
    ``seconds_per_1000``). A student samples in its own steps; ``sampler`` and ``cfg_scale`` are for teachers.

    ``nfe`` counts network evaluations per sample, CFG's unconditional branch included.
    """
    from .student import Student

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    labels = _labels_for(model, n, labels)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *model.sample_shape), generator=gen)
    if isinstance(model, Student):
        if steps is not None and steps != model.steps:
            raise UserError(f"this student samples in {model.steps} steps (its training timesteps); drop --steps "
                            f"or pass --steps {model.steps}")
        evals = model.steps

        def run(z_b: Tensor, cond: Tensor | None) -> Tensor:
            return model.sample(len(z_b), labels=cond, z=z_b, generator=gen)
    else:
        steps = check_steps(DEFAULT_STEPS if steps is None else steps)
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        den = guided(model, cfg_scale) if labels is not None else model
        evals = nfe(sampler, steps) * (2 if labels is not None and cfg_scale != 1.0 else 1)

        def run(z_b: Tensor, cond: Tensor | None) -> Tensor:
            return run_sampler(den, z_b, steps, sampler, cond=cond, generator=gen)

    out = []
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        out.append(run(z[i : i + batch_size], None if labels is None else labels[i : i + batch_size]))
    seconds = time.perf_counter() - start
    return torch.cat(out), labels, {"nfe": evals, "seconds_per_1000": seconds / n * 1000}


def sample(model: Denoiser, n: int, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``n`` samples (and their labels) from ``model``; keyword arguments as :func:`generate`."""
    x, labels, _ = generate(model, n, **kwargs)
    return x, labels


def evaluate(
    model: Denoiser,
    data: str | None = None,
    n: int = 2000,
    steps: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    cfg_scale: float = 1.0,
    seed: int = 0,
    inception: bool = False,
    inception_weights: str | Path | None = None,
) -> dict[str, Any]:
    """Sample ``model`` and measure it against the held-out split of ``data`` (default: the model's own data).

    With ``inception`` (or an ``inception_weights`` path) it adds ``inception_fid`` (torchmetrics' Inception-v3 from
    the local weights file; the error names the file when it is missing); on images other than digits it is the only
    FID.

    Returns a dict with ``fid``, ``precision``, ``recall``, ``class_accuracy`` (images) or ``sliced_w``,
    ``modes_covered``, ``high_quality`` (points), plus ``nfe`` and ``seconds_per_1000``.
    """
    from .data import load_data
    from .eval.evaluate import evaluate_samples

    data = data or model_data(model)
    if data is None:
        raise UserError("this model does not record its training data; pass --data")
    from .models.hf import decode_samples, image_shape

    shape = image_shape(model)  # latent diffusers models are measured on their decoded images
    resolution = shape[-1] if len(shape) == 3 else None
    channels = shape[0] if len(shape) == 3 and shape != tuple(model.sample_shape) else None
    test = load_data(data, "test", resolution=resolution, channels=channels)
    if tuple(test.sample_shape) != tuple(shape):
        raise UserError(f"the model makes samples of shape {tuple(shape)} but {data} has {tuple(test.sample_shape)}")
    x, labels, timing = generate(model, n, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
    x = decode_samples(model, x)
    want_inception = inception or inception_weights is not None
    digits_shaped = test.kind != "image" or tuple(test.sample_shape) in ((1, 8, 8), (1, 16, 16))
    metrics = evaluate_samples(x, test, labels=labels) if digits_shaped or not want_inception else {}
    if want_inception:
        if test.kind != "image":
            raise UserError("Inception FID is for images; 2-D data is measured with sliced_w and mode coverage")
        from .eval.inception import inception_fid

        metrics["inception_fid"] = inception_fid(test.x, x, weights_path=inception_weights)
    empty = dict.fromkeys(("fid", "precision", "recall", "class_accuracy"))
    if hasattr(model, "steps"):  # a student: its own steps, its own sampler
        steps, sampler = model.steps, "student"
    else:
        steps = steps or DEFAULT_STEPS
    return {**empty, **metrics, **timing, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "n": n, "data": data}
