"""The Python API; the CLI is a thin layer over these functions.

    teacher = fewstep.load_teacher("digits")
    x, labels = fewstep.sample(teacher, 64, steps=32, sampler="heun")
    metrics = fewstep.evaluate(teacher, data="digits", steps=4)
"""
from __future__ import annotations

import math
import os
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
from .options import MAX_CONTINUOUS_STEPS, check_cfg_scale, check_seed, whole_number

#: teacher sampling defaults when a caller gives none
DEFAULT_SAMPLER = "heun"
DEFAULT_STEPS = 32


class _NoTeacher(UserError):
    """Nothing loadable at a teacher spec (:func:`load_model` then names students too)."""


def load_teacher(spec: str | Path | torch.nn.Module, resolution: int | None = None,
                 dtype: torch.dtype | None = None) -> Denoiser:
    """Load a teacher denoiser.

    Args:
        spec: an embedded name (``digits``, ``ring8``, ``grid25``, ``moons``, ``checkerboard``, ``swissroll``), a run
            directory written by ``fewstep teacher train``, the path of a saved ``.safetensors``/``.json`` pair, or
            a local diffusers folder (a pipeline with ``model_index.json`` or a bare model; see
            :mod:`fewstep.models.hf`); or a :class:`Denoiser` already built (``fewstep.wrap(module, ...)``), returned
            as it is.
        resolution: diffusers folders only: the image side to work at (default: the model's own).
        dtype: diffusers folders only: the dtype to load the model and its text encoders and VAE in (default
            float32).

    Returns:
        The denoiser in eval mode without gradients; its saved description is in ``.info``.
    """
    if isinstance(spec, torch.nn.Module):
        return as_teacher(spec)
    spec_s = str(spec)
    path = Path(spec_s)
    if spec_s == zoo.TEXT_TEACHER and not path.exists():  # the text-to-image teacher: a diffusers pipeline folder
        path = zoo.text_teacher_folder()
    if spec_s in zoo.TEACHERS:
        prefix = zoo.require(spec_s)
    elif path.is_dir() and (path / "model.json").is_file():
        prefix = path / "model"
    elif path.suffix in (".json", ".safetensors") and path.is_file():
        prefix = path.with_suffix("")
    elif path.is_dir() and ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        from .models.hf import load_diffusers

        return load_diffusers(path, dtype=dtype or torch.float32, resolution=resolution)
    elif path.is_dir() and (path / "model.safetensors").is_file():
        raise UserError(f"{path / 'model.json'} is missing: the teacher's weights need the description saved beside "
                        "them; copy it back from where the run was made")
    elif path.is_dir() and (path / "student.json").is_file():
        raise UserError(f"{path} is a distillation run (its student.json is a student, not a teacher); distill from "
                        "its teacher (its config.yaml names it), or sample the student with `fewstep sample "
                        "--student`")
    else:
        from .models.hf import missing_index_message

        if missing_index_message(path):
            raise UserError(missing_index_message(path))
        raise _NoTeacher(
            f"no teacher at {spec_s!r}: give an embedded name ({', '.join(zoo.TEACHERS)}), "
            "a run directory from `fewstep teacher train`, a .safetensors file with its .json, or a diffusers folder"
        )
    if resolution is not None or dtype is not None:
        raise UserError("resolution and dtype are options of diffusers teachers; fewstep's own networks have theirs")
    try:
        den, desc = load_denoiser(prefix)
    except UserError as e:
        if spec_s not in zoo.TEACHERS:
            raise
        raise UserError(f"{e}; for a shipped teacher: rebuild it with `{zoo.build_command(spec_s)}` or reinstall "
                        "fewstep") from None
    if (desc.get("meta") or {}).get("kind") == "student":
        raise UserError(f"{prefix.with_suffix('.json')} is a distilled student, not a teacher; distill from its "
                        "teacher (the run's config.yaml names it), or sample the student with `fewstep sample "
                        "--student`")
    den.info = desc
    return den


def as_teacher(module: torch.nn.Module) -> Denoiser:
    """``module`` when it is a :class:`Denoiser`; a plain module is a one-line :class:`UserError` naming
    :func:`fewstep.wrap`."""
    if isinstance(module, Denoiser):
        return module
    raise UserError(f"the teacher is a plain {type(module).__name__}; make it a fewstep teacher first: "
                    "fewstep.wrap(module, schedule='edm'|'ddpm'|'flow', prediction='x0'|'eps'|'v'|'flow', "
                    "sample_shape=...) (see the README's 'Your own network')")


def teacher_label(teacher: Denoiser) -> str:
    """How a run's config names a teacher given as an object (its ``teacher`` field is a string)."""
    what = (getattr(teacher, "info", None) or {}).get("meta", {}).get("module") or type(teacher.net).__qualname__
    return f"<python {what}>"


def as_dataset(data: Any, sample_shape: tuple[int, ...] | None = None, num_classes: int = 0,
               need_labels: bool = False) -> Any:
    """In-memory data as a :class:`fewstep.data.Dataset`: a tensor or numpy array ``(N, D)`` / ``(N, C, H, W)``, a
    pair ``(x, labels)``, a ``fewstep.data.Dataset``, or a ``torch.utils.data.Dataset`` of ``x`` or ``(x, label)``
    items (read whole into memory, as fewstep holds every data set).

    Args:
        sample_shape: the model's sample shape the data must have.
        num_classes: the model's classes; labels must lie in ``0..num_classes-1``.
        need_labels: a class-conditional model's training data: labels are required.
    """
    import numpy as np

    from .data import Dataset

    given = data if isinstance(data, Dataset) else None
    if given is not None:
        x, labels = given.x, given.labels
    else:
        labels = None
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.TensorDataset):
            try:
                items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
            except TypeError:
                raise UserError("data is a torch Dataset without a length (an iterable one); pass a tensor, a numpy "
                                "array or an (x, labels) pair") from None
            pairs = [it if isinstance(it, (tuple, list)) else (it,) for it in items]
            data = (torch.stack([torch.as_tensor(p[0]) for p in pairs]),
                    torch.as_tensor([int(p[1]) for p in pairs]) if pairs and len(pairs[0]) > 1 else None)
        elif isinstance(data, torch.utils.data.TensorDataset):
            data = tuple(data.tensors) if len(data.tensors) > 1 else data.tensors[0]
        if isinstance(data, (tuple, list)):
            if len(data) != 2:
                raise UserError(f"data as a tuple is (x, labels), got {len(data)} items; pass x alone or (x, labels)")
            data, labels = data
        try:
            x = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"data must be a tensor, a numpy array, an (x, labels) pair or a Dataset, not a "
                            f"{type(data).__name__} ({e})") from None
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int32, torch.int64)) or x.ndim not in (2, 4):
        raise UserError(f"data must be vectors (N, D) or images (N, C, H, W) of numbers, got {x.dtype} of shape "
                        f"{tuple(x.shape)}")
    x = x.detach().float().cpu()
    if len(x) < 2:
        raise UserError(f"data holds {len(x)} sample(s); pass at least 2")
    if not torch.isfinite(x).all():
        raise UserError("data holds NaN or infinite values; drop or fix those samples")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        raise UserError(f"data has samples of shape {tuple(x.shape[1:])} but the model makes {tuple(sample_shape)}; "
                        "pass data of the model's sample_shape")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        if labels.is_floating_point() or labels.ndim != 1 or len(labels) != len(x):
            raise UserError(f"labels must be {len(x)} class indices (a 1-D integer tensor, one per sample), got "
                            f"{labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long().cpu()
        if num_classes > 0 and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"labels must lie in 0..{num_classes - 1} (the model's classes), got "
                            f"{int(labels.min())}..{int(labels.max())}")
    if need_labels and num_classes > 0 and labels is None:
        raise UserError(f"the teacher is class-conditional ({num_classes} classes); pass data=(x, labels)")
    if given is not None:
        return given
    kind = "image" if x.ndim == 4 else "points"
    classes = num_classes if labels is not None else 0
    name = f"<in-memory {'images' if kind == 'image' else 'vectors'} {tuple(x.shape)}>"
    return Dataset(name, kind, x, labels if classes else None, classes, [str(k) for k in range(classes)])


def load_model(spec: str | Path) -> Any:
    """A teacher (as :func:`load_teacher`) or a distilled student: a ``fewstep distill`` run directory or its
    ``student.safetensors``/``.json``."""
    from .student import load_student

    if isinstance(spec, torch.nn.Module):  # a model already built: a student, or a teacher (fewstep.wrap)
        return spec if hasattr(spec, "steps") else as_teacher(spec)
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
    if path.is_dir() and (path / "student.safetensors").is_file():
        raise UserError(f"{path / 'student.json'} is missing: the student's weights need the description saved "
                        "beside them; copy it back from where the run was made")
    finished = (path / "model.json").is_file() or (path / "model_index.json").is_file()  # (a text teacher's pipeline)
    if path.is_dir() and (path / "config.yaml").is_file() and not finished:
        raise UserError(f"{path} holds no finished model yet; finish the run with --resume")
    try:
        return load_teacher(spec)
    except _NoTeacher:
        raise UserError(f"no model at {str(spec)!r}: give a `fewstep distill` run directory (or its student.json), "
                        f"an embedded teacher ({', '.join(zoo.TEACHERS)}), a `fewstep teacher train` run directory, "
                        "a .safetensors file with its .json, or a diffusers folder") from None


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


def max_steps(schedule: Any) -> int:
    """The most sampling steps ``schedule`` has: its discrete timesteps (DDPM, flow), else ``MAX_CONTINUOUS_STEPS``."""
    return int(getattr(schedule, "num_train_timesteps", None) or MAX_CONTINUOUS_STEPS)


def check_steps(steps: Any, schedule: Any = None, flag: str = "--steps") -> int:
    """``steps`` as an int: a whole number of at least 1 and, given the model's ``schedule``, at most its steps
    (:func:`max_steps`); else a one-line :class:`UserError` naming the value and the fix."""
    steps = whole_number(steps, flag)
    most = max_steps(schedule) if schedule is not None else steps
    if steps > most:
        has = (f"{most} timesteps" if getattr(schedule, "num_train_timesteps", None)
               else f"a continuous time; fewstep takes at most {most} steps")
        raise UserError(f"{flag} {steps} is more than the model's {schedule.kind} schedule has ({has}); "
                        f"pass {flag} {most} or fewer")
    return steps


def available_memory() -> int:
    """Bytes of memory available now (psutil when installed, else the free pages the OS reports)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


#: float32 copies of the samples held at once while sampling: the noise, the batches' outputs, their concatenation
SAMPLE_COPIES = 3


def check_sample_count(n: Any, shape: tuple[int, ...], flag: str = "--n") -> int:
    """``n`` as an int: at least 1, and ``n`` samples of ``shape`` (float32, :data:`SAMPLE_COPIES` copies) must fit
    in the memory available now; else a one-line :class:`UserError` with the largest ``n`` that fits."""
    n = whole_number(n, flag)
    per_sample = math.prod(shape) * 4 * SAMPLE_COPIES
    free = available_memory()
    if n * per_sample > free:
        raise UserError(f"{flag} {n} needs about {n * per_sample / 1e9:,.1f} GB for samples of shape {tuple(shape)} "
                        f"({SAMPLE_COPIES} float32 copies) but {free / 1e9:,.1f} GB of memory is available; pass "
                        f"{flag} {max(1, free // per_sample)} or fewer")
    return n


def check_sampling(model: Any, n: Any, steps: Any, sampler: str, cfg_scale: Any, seed: Any,
                   shape: tuple[int, ...] | None = None) -> tuple[int, int | None, float, int]:
    """The sampling arguments of :func:`generate` and :func:`evaluate`, checked before anything is loaded or drawn
    (one-line :class:`UserError` each): ``n`` against memory for samples of ``shape`` (default the model's), the
    teacher's ``steps`` against its schedule, ``sampler``, ``cfg_scale``, ``seed``. A student takes no other step
    count than its own. Returns ``n``, ``steps`` (None for a student), ``cfg_scale`` and ``seed``."""
    from .student import Student

    n = check_sample_count(n, tuple(shape or model.sample_shape))
    cfg_scale = check_cfg_scale(cfg_scale)
    seed = check_seed(seed)
    if isinstance(model, Student):
        if steps is not None and steps != model.steps:
            raise UserError(f"this student samples in {model.steps} steps (its training timesteps); drop --steps "
                            f"or pass --steps {model.steps}")
        return n, None, cfg_scale, seed
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    return n, check_steps(DEFAULT_STEPS if steps is None else steps, model.schedule), cfg_scale, seed


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

    n, steps, cfg_scale, seed = check_sampling(model, n, steps, sampler, cfg_scale, seed)
    batch_size = whole_number(batch_size, "batch_size")
    is_student = isinstance(model, Student)
    labels = _labels_for(model, n, labels)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *model.sample_shape), generator=gen)
    if is_student:
        evals = model.steps

        def run(z_b: Tensor, cond: Tensor | None) -> Tensor:
            return model.sample(len(z_b), labels=cond, z=z_b, generator=gen)
    else:
        den = guided(model, cfg_scale) if labels is not None else model
        evals = nfe(sampler, steps) * (2 if labels is not None and cfg_scale != 1.0 else 1)

        params = next(model.parameters(), None)
        device = params.device if params is not None else torch.device("cpu")

        def run(z_b: Tensor, cond: Tensor | None) -> Tensor:  # the noise on the teacher's device, samples back on CPU
            cond = None if cond is None else cond.to(device)
            return run_sampler(den, z_b.to(device), steps, sampler, cond=cond, generator=gen).cpu()

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


def read_prompts(prompts: str | Path | list[str]) -> list[str]:
    """Prompts from a list, or from a text file with one prompt a line (blank lines skipped)."""
    if isinstance(prompts, (list, tuple)):
        out = [str(p) for p in prompts]
    else:
        path = Path(str(prompts))
        if not path.is_file():
            raise UserError(f"prompts file {path} not found; give a text file with one prompt a line")
        try:
            out = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts file {path} ({e}); give a UTF-8 text file with one prompt a line") \
                from None
    if not out:
        raise UserError(f"no prompts in {prompts}; give at least one prompt (one a line)")
    return out


def _is_text_model(model: Any) -> bool:
    den = getattr(model, "generator", model)
    return bool(getattr(den, "text_conditional", False))


def evaluate(
    model: Denoiser,
    data: Any = None,
    n: int = 2000,
    steps: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    cfg_scale: float = 1.0,
    seed: int = 0,
    inception: bool = False,
    inception_weights: str | Path | None = None,
    patch_fid: bool = False,
    patch_size: int = 299,
    clip: bool = False,
    clip_model: Any = None,
    prompts: str | Path | list[str] | None = None,
    feature_extractor: torch.nn.Module | None = None,
    feature_network: torch.nn.Module | None = None,
    classifier: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Sample ``model`` and measure it against ``data`` (default: the model's own data): digits-domain FID, precision
    and recall against its train split (as CIFAR-10 and ImageNet FIDs are computed), with ``fid_heldout`` against its
    test split beside it (the memorisation check); points, Inception FID, patch FID against the test split.

    Args:
        model: a teacher or a student (:func:`load_model`).
        data: reference data: an embedded name, an image folder or a point file (default: the model's own); or data
            in memory (a tensor, numpy array, ``(x, labels)`` pair or Dataset, as :func:`as_dataset` takes), which
            is measured as it is given (pass held-out data): ``sliced_w`` for vectors; for images ``fid``,
            ``precision`` and ``recall`` on ``feature_network``'s features and/or ``inception_fid``, and
            ``class_accuracy`` with ``classifier``.
        n: samples to draw (and to measure).
        steps, sampler, cfg_scale: teachers' sampling (a student samples in its own steps).
        seed: seed of the initial noise.
        inception: add ``inception_fid`` (torchmetrics' Inception-v3 on the whole images; on images other than
            digits it is the only FID).
        inception_weights: the Inception weights file (implies ``inception``; default ``$FEWSTEP_INCEPTION_WEIGHTS``
            or ``~/.cache/fewstep/pt_inception-2015-12-05-6726825d.pth``).
        patch_fid: add ``patch_fid``: Inception FID on the ``patch_size`` centre crops of the full-resolution images
            (SDXL-Lightning's measure of detail); same weights file.
        patch_size: side of the patch (299: Inception's input size, no resizing).
        clip: add ``clip_score`` (text-to-image models; needs ``prompts``).
        clip_model: a transformers CLIP folder (implies ``clip``; default ``$FEWSTEP_CLIP_MODEL`` or
            ``~/.cache/fewstep/clip-vit-large-patch14``) or a loaded :class:`fewstep.eval.clip.CLIP`.
        prompts: text-to-image models: the prompts to sample from (a list, or a text file with one a line); they are
            used in order and repeated to make ``n`` images. Without them a text-to-image model samples on the
            empty prompt.
        feature_extractor: a module mapping uint8 RGB images ``(B, 3, H, W)`` to features ``(B, D)`` to use
            instead of Inception for ``inception_fid`` and ``patch_fid`` (no weights file needed).
        feature_network: data in memory, images: a module mapping images as the model makes them ``(B, C, H, W)``
            to features ``(B, D)``, for ``fid``, ``precision`` and ``recall``.
        classifier: data in memory, class-conditional models: a module mapping images (or vectors) to class logits
            ``(B, K)``; ``class_accuracy`` is the share of samples it assigns the class they were drawn for.

    Missing weights files are a one-line :class:`UserError` naming what to provide, raised before any sampling.

    Returns:
        A dict with ``fid``, ``fid_heldout``, ``precision``, ``recall``, ``class_accuracy`` (digits images) or ``sliced_w``,
        ``modes_covered``, ``high_quality`` (points), plus ``inception_fid``, ``patch_fid`` and ``clip_score`` when
        asked for, ``nfe`` and ``seconds_per_1000``.
    """
    from .data import load_data
    from .eval.evaluate import evaluate_against
    from .models.hf import decode_samples, image_shape

    shape = image_shape(model)  # latent diffusers models are measured on their decoded images
    # the numbers first: a bad one is reported before any weights, data or sampling
    n, _, cfg_scale, seed = check_sampling(model, n, steps, sampler, cfg_scale, seed, shape=tuple(shape))
    patch_size = whole_number(patch_size, "--patch-size")
    want_inception = inception or inception_weights is not None
    want_clip = clip or clip_model is not None
    if data is not None and not isinstance(data, (str, Path)):  # data in memory: measured as given
        if want_clip or prompts is not None or patch_fid:
            raise UserError("CLIP score and patch FID measure named data (an image folder); drop clip, prompts and "
                            "patch_fid, or pass data= the folder")
        return _evaluate_in_memory(model, as_dataset(data, tuple(shape), model.num_classes), n, steps, sampler,
                                   cfg_scale, seed, want_inception, inception_weights, feature_extractor,
                                   feature_network, classifier)
    if feature_network is not None or classifier is not None:
        raise UserError("feature_network and classifier are for data given in memory (data=<tensor>); named data "
                        "has its own metrics: drop them")
    data = data or model_data(model)
    if data is None:
        raise UserError("this model does not record its training data; pass --data")
    prompt_list = read_prompts(prompts) if prompts is not None else None
    text_model = _is_text_model(model)
    if prompt_list is not None and not text_model:
        raise UserError("prompts are for text-to-image models; this one is not: drop --prompts (and --clip)")
    if want_clip and not text_model:
        raise UserError("CLIP score measures text-to-image models; this one is not: drop --clip")
    if want_clip and prompt_list is None:
        raise UserError("CLIP score needs the prompts to sample from: pass --prompts FILE (one prompt a line)")
    # weights first: a missing file is reported before minutes of sampling
    if (want_inception or patch_fid) and feature_extractor is None:
        from .eval.inception import resolve_weights_path

        inception_weights = resolve_weights_path(inception_weights)
    clip_net = None
    if want_clip:
        from .eval.clip import CLIP, load_clip

        clip_net = clip_model if isinstance(clip_model, CLIP) else load_clip(clip_model)
    resolution = shape[-1] if len(shape) == 3 else None
    channels = shape[0] if len(shape) == 3 and shape != tuple(model.sample_shape) else None
    test = load_data(data, "test", resolution=resolution, channels=channels)
    if tuple(test.sample_shape) != tuple(shape):
        raise UserError(f"the model makes samples of shape {tuple(shape)} but {data} has {tuple(test.sample_shape)}")
    if (want_inception or patch_fid or want_clip) and test.kind != "image":
        raise UserError("Inception FID, patch FID and CLIP score are for images; 2-D data is measured with sliced_w "
                        "and mode coverage")
    if patch_fid and min(shape[-2:]) < patch_size:
        raise UserError(f"patch FID crops {patch_size}x{patch_size} patches from full-resolution images, but this "
                        f"model makes {shape[-2]}x{shape[-1]}; use --inception for small images or a smaller "
                        "--patch-size")
    if prompt_list is not None:
        x, labels, timing = _generate_from_prompts(model, prompt_list, n, steps, sampler, cfg_scale, seed)
        used_prompts = [prompt_list[i % len(prompt_list)] for i in range(n)]
    else:
        x, labels, timing = generate(model, n, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
        x = decode_samples(model, x)
        used_prompts = None
    digits_shaped = test.kind != "image" or tuple(test.sample_shape) in ((1, 8, 8), (1, 16, 16))
    named_metric = want_inception or patch_fid or want_clip
    metrics = (evaluate_against(x, data, labels, resolution=resolution, channels=channels, prompts=used_prompts)
               if digits_shaped or not named_metric else {})
    if want_inception:
        from .eval.inception import inception_fid

        metrics["inception_fid"] = inception_fid(test.x, x, weights_path=inception_weights,
                                                 feature_extractor=feature_extractor)
    if patch_fid:
        from .eval.inception import patch_fid as measure_patch_fid

        metrics["patch_fid"] = measure_patch_fid(test.x, x, patch=patch_size, weights_path=inception_weights,
                                                 feature_extractor=feature_extractor)
    if want_clip:
        from .eval.clip import clip_score

        metrics["clip_score"] = clip_score(x, used_prompts, clip_net)
    empty = dict.fromkeys(("fid", "fid_heldout", "precision", "recall", "class_accuracy"))
    if hasattr(model, "steps"):  # a student: its own steps, its own sampler
        steps, sampler = model.steps, "student"
    else:
        steps = steps or DEFAULT_STEPS
    return {**empty, **metrics, **timing, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "n": n, "data": data}


@torch.no_grad()
def _apply(net: torch.nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """``net`` on ``x`` in batches, on the network's device, as float32 on the CPU."""
    device = next(iter(net.parameters()), torch.empty(0)).device
    return torch.cat([net(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def _evaluate_in_memory(model: Any, ref: Any, n: int, steps: int | None, sampler: str, cfg_scale: float, seed: int,
                        want_inception: bool, inception_weights: str | Path | None, feature_extractor: Any,
                        feature_network: Any, classifier: Any) -> dict[str, Any]:
    """:func:`evaluate` against data in memory (``ref``, a Dataset), as its docstring says."""
    from .eval.evaluate import evaluate_samples
    from .eval.metrics import feature_stats, frechet_distance, precision_recall
    from .models.hf import decode_samples

    if ref.kind == "image" and feature_network is None and not want_inception:
        raise UserError("FID on images given in memory needs a feature network: pass feature_network=<module "
                        "mapping images to (B, D) features>, or inception_weights=<the local Inception weights file>")
    if ref.kind == "points" and (feature_network is not None or want_inception):
        raise UserError("vectors are measured with sliced_w; feature_network and Inception FID are for images: drop "
                        "them")
    if classifier is not None and model.num_classes == 0:
        raise UserError("class_accuracy needs a class-conditional model; this one is unconditional: drop classifier")
    if want_inception and feature_extractor is None:  # a missing weights file is reported before any sampling
        from .eval.inception import resolve_weights_path

        inception_weights = resolve_weights_path(inception_weights)
    x, labels, timing = generate(model, n, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
    x = decode_samples(model, x)
    metrics: dict[str, Any] = {}
    if ref.kind == "points":
        metrics.update(evaluate_samples(x, ref))
    if feature_network is not None:
        f_real, f_fake = _apply(feature_network, ref.x), _apply(feature_network, x)
        if f_fake.ndim != 2:
            raise UserError(f"feature_network must return (B, D) features, got {tuple(f_fake.shape)}; flatten or "
                            "pool its output")
        precision, recall = precision_recall(f_real, f_fake, k=3)
        metrics.update(fid=frechet_distance(*feature_stats(f_fake), *feature_stats(f_real)), precision=precision,
                       recall=recall)
    if want_inception:
        from .eval.inception import inception_fid

        metrics["inception_fid"] = inception_fid(ref.x, x, weights_path=inception_weights,
                                                 feature_extractor=feature_extractor)
    if classifier is not None:
        metrics["class_accuracy"] = float((_apply(classifier, x).argmax(1) == labels).double().mean())
    steps, sampler = (model.steps, "student") if hasattr(model, "steps") else (steps or DEFAULT_STEPS, sampler)
    empty = dict.fromkeys(("fid", "precision", "recall", "class_accuracy"))
    return {**empty, **metrics, **timing, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale, "n": n,
            "data": ref.name}


def _generate_from_prompts(model: Any, prompts: list[str], n: int, steps: int | None, sampler: str,
                           cfg_scale: float, seed: int, batch_size: int = 64) -> tuple[Tensor, None, dict[str, float]]:
    """``n`` decoded images of a text-to-image model, on ``prompts`` in order (repeated as needed), and timing."""
    from .diffusion.samplers import nfe as count_nfe
    from .models.hf import generate_images
    from .student import Student

    n, steps, cfg_scale, seed = check_sampling(model, n, steps, sampler, cfg_scale, seed)
    if isinstance(model, Student):
        evals, kwargs = model.steps, {}
    else:
        evals = count_nfe(sampler, steps) * (2 if cfg_scale != 1.0 else 1)
        kwargs = dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale)
    ps = [prompts[i % len(prompts)] for i in range(n)]
    out = []
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        out.append(generate_images(model, ps[i : i + batch_size], seed=seed + i, **kwargs))
    seconds = time.perf_counter() - start
    return torch.cat(out), None, {"nfe": evals, "seconds_per_1000": seconds / n * 1000}
