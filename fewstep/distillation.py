"""``fewstep.distill``: teacher in, few-step student out, in a run directory that is never overwritten.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, TensorBoard events (``tb/``), ``checkpoints/``,
``samples/`` (grids over training), the student (``student.safetensors`` + ``.json``), ``eval.json`` and
``report.html``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import LoopConfig, load_config, validate_config
from .errors import UserError
from .io import atomic_write_json, check_writable
from .student import Student, save_student

from .methods import METHOD_NAMES as METHODS, registry


def make_config(
    method: str | None = "dmd2",
    config: str | Path | dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """The resolved config of a distillation run: the method's defaults, then ``config`` (YAML path or dict), then
    ``overrides`` (``None`` values are ignored; loop options such as ``iterations``/``seed``/``batch_size`` go to
    ``loop``). ``method=None``: the config's own method, else ``dmd2``."""
    if method is None:
        method = config_method(config) or "dmd2"
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = registry()[method][0]
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = load_config(config, cls).model_dump(mode="json")
    if data.get("method", method) != method:
        raise UserError(f"the config is for method {data['method']!r}, not {method!r}; pass --method {data['method']}")
    if overrides.get("resolution") is not None and _resolution_field(cls, data, overrides) is None:
        raise UserError(f"--resolution is not an option of {method} yet; set "
                        "sample_size in the diffusers model's config.json instead, or use fewstep.load_teacher("
                        "folder, resolution=) in Python")
    loop = dict(data.get("loop") or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in LoopConfig.model_fields:
            loop[key] = value
        elif key not in cls.model_fields and "base" in cls.model_fields:  # a wrapper (DisBack): the base's option
            base = data.get("base") or overrides.get("base") or cls.model_fields["base"].default
            data[base] = {**(data.get(base) or {}), key: value}
        else:
            data[key] = value
    if loop:
        data["loop"] = {**cls.model_fields["loop"].default_factory().model_dump(), **loop}
    return validate_config(cls, data, "config")


def config_method(config: str | Path | dict[str, Any] | None) -> str | None:
    """The ``method`` a config names (None when it names none, or cannot be read: :func:`make_config` says why)."""
    if isinstance(config, dict):
        data: Any = config
    elif config is None:
        return None
    else:
        import yaml

        try:
            data = yaml.safe_load(Path(config).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
    value = data.get("method") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def resume_config(out: str | Path, config: str | Path | dict[str, Any] | None, resume: bool) -> Any:
    """The config a run starts from: ``config``; on resume without one, the run's own ``config.yaml`` (not the
    defaults; options given still apply on top, and the checkpoint's config is compared with the result)."""
    own = Path(out) / "config.yaml"
    return own if resume and config is None and own.is_file() else config


def _resolution_field(cls: Any, data: dict[str, Any], overrides: dict[str, Any]) -> str | None:
    """Where a method's config keeps ``resolution``: ``"resolution"``, the wrapped method's block (DisBack) or
    None when it has no such field."""
    if "resolution" in cls.model_fields:
        return "resolution"
    if "base" in cls.model_fields:
        base = data.get("base") or overrides.get("base") or cls.model_fields["base"].default
        block = cls.model_fields.get(base)
        if block is not None and "resolution" in getattr(_config_class(block.annotation), "model_fields", {}):
            return base
    return None


def _config_class(annotation: Any) -> Any:
    """``DMD2Config`` out of ``DMD2Config | None``."""
    import typing

    for arg in (*typing.get_args(annotation), annotation):
        if isinstance(arg, type) and hasattr(arg, "model_fields"):
            return arg
    return None


def config_resolution(cfg: Any) -> int | None:
    """The image side a run distils at (``resolution`` of the config or of its wrapped method's block)."""
    value = getattr(cfg, "resolution", None)
    if value is None and hasattr(cfg, "base"):
        value = getattr(getattr(cfg, str(cfg.base), None), "resolution", None)
    return value


#: config fields that count steps on the teacher's schedule
STEP_FIELDS = ("steps", "student_times", "teacher_steps", "regression_teacher_steps")


def check_schedule_steps(cfg: Any, schedule: Any) -> None:
    """Every step count of ``cfg`` fits the teacher's ``schedule``, or a one-line error naming the field and the fix."""
    from .api import check_steps

    for name in STEP_FIELDS:
        value = getattr(cfg, name, None)
        if value is not None:
            check_steps(value, schedule, flag="--steps" if name == "steps" else name)


def config_guidance(cfg: Any) -> float:
    """The CFG scale on the real score a run distils with (``guidance_scale`` of the config or of its wrapped
    method's block; 1 when it has none)."""
    if hasattr(cfg, "base_config"):  # DisBack: the wrapped method's resolved config
        cfg = cfg.base_config()
    value = getattr(cfg, "guidance_scale", None)
    return 1.0 if value is None else float(value)


def _sample_writer(student_of: Any, data_name: str | None) -> Any:
    from .eval.images import save_samples
    from .models.hf import DiffusersDenoiser, decode_samples

    def write(step: int, path: Path) -> None:
        student = student_of()
        diffusers = isinstance(student.generator, DiffusersDenoiser)  # real-size models: a 4x4 grid, decoded
        x = student.sample(16 if diffusers else 100 if len(student.sample_shape) == 3 else 2000, seed=1234)
        save_samples(decode_samples(student, x), path, data_name, title=f"iteration {step}")

    return write


def prepare_data(teacher: Any, data_name: str) -> Any:
    """The training split of ``data_name`` in ``teacher``'s space.

    Diffusers teachers: images VAE-encoded to latents and captions encoded to prompt embeddings, both cached on disk
    (:mod:`fewstep.models.hf`). Under ``accelerate launch`` the main process of each machine prepares first and
    writes the cache (atomically); the other processes wait, then read it instead of encoding the data again.
    """
    from accelerate import PartialState

    from .data import load_data
    from .models.hf import DiffusersDenoiser, prepare_training_data, prepare_training_folder

    if not isinstance(teacher, DiffusersDenoiser):
        resolution = teacher.sample_shape[-1] if len(teacher.sample_shape) == 3 else None
        return load_data(data_name, "train", resolution=resolution)
    state = PartialState(cpu=not torch.cuda.is_available())  # as the loop's Accelerator
    with state.local_main_process_first():  # one encoder per machine; a shared cache folder is safe too (atomic)
        if Path(data_name).is_dir():  # streamed: decoded and VAE-encoded in chunks, cached
            return prepare_training_folder(teacher, data_name)
        # pixels at the VAE's resolution, encoded to latents; captions encoded to prompt embeddings
        return prepare_training_data(teacher, load_data(data_name, "train", teacher.data_resolution))


def distill(
    teacher: str | torch.nn.Module | None = None,
    method: str | None = "dmd2",
    steps: int | None = None,
    out: str | Path = "runs/distill",
    config: str | Path | dict[str, Any] | None = None,
    resume: bool = False,
    restart: bool = False,
    evaluate_n: int = 1000,
    inception_weights: str | Path | None = None,
    data: Any = None,
    **overrides: Any,
) -> Student:
    """Distill ``teacher`` into a ``steps``-step student with ``method``.

    Args:
        teacher: an embedded teacher name, a ``fewstep teacher train`` run directory or a local diffusers folder
            (default: the config's, else ``digits``; a diffusers teacher needs ``data``: an image folder, with
            captions for text-to-image teachers); or a :class:`~fewstep.diffusion.denoiser.Denoiser` object, such
            as ``fewstep.wrap(your_module, ...)`` (its config records ``<python ...>``; it needs ``data``).
        method: ``dmd2``, ``add``, ``lightning`` or ``disback`` (which wraps ``dmd2`` or ``add``; see its config's
            ``base``); None: the config's own (on resume, the run's), else ``dmd2``.
        steps: student sampling steps (1..8).
        out: the run directory (must not exist unless ``resume`` or ``restart``).
        config: a YAML file or dict of the method's config (see ``configs/``); on resume, default: ``out/config.yaml``.
        resume: continue the run in ``out`` from its newest checkpoint that loads; refused when there is none or
            when the resolved config differs from the checkpoint's (beyond a longer ``iterations`` and
            ``fewstep.train.loop.SAFE_TO_CHANGE_ON_RESUME``).
        restart: move an existing ``out`` aside (to ``<out>.before-restart-<UTC time>``; nothing is deleted) once
            the options are checked, and start a new run there.
        evaluate_n: samples for the final evaluation in ``eval.json`` and the report (0: skip).
        inception_weights: the Inception weights file (default ``$FEWSTEP_INCEPTION_WEIGHTS``): images other than
            digits (a diffusers teacher's, an image folder's) get Inception FID in the report; without it the report
            says how to measure FID and keeps NFE, timing, curves and samples.
        data: the real data: an embedded name, an image folder or a point file (default: the config's, else the
            teacher's own); or data in memory: a tensor or numpy array ``(N, D)`` / ``(N, C, H, W)``, an ``(x,
            labels)`` pair (a class-conditional teacher needs the labels) or a Dataset
            (:func:`fewstep.api.as_dataset`).
        **overrides: any config field (``guidance_scale=2.0``, ``gan=False``) or loop field (``iterations=500``).

    Returns:
        The student (also saved as ``out/student.safetensors``).
    """
    from .api import as_dataset, as_teacher, load_teacher, model_data, teacher_label
    from .train.loop import check_run_dir, set_aside, train

    out = Path(out)
    teacher_obj = as_teacher(teacher) if isinstance(teacher, torch.nn.Module) else None
    in_memory = data is not None and not isinstance(data, (str, Path))
    cfg = make_config(method, resume_config(out, config, resume),
                      teacher=teacher_label(teacher_obj) if teacher_obj is not None else teacher, steps=steps,
                      data=None if in_memory or data is None else str(data), **overrides)
    method = cfg.method
    check_run_dir(out, resume, restart)
    check_writable(out)  # a read-only or full place is refused now, not after loading the teacher and data
    if inception_weights is not None and evaluate_n > 0:  # a wrong path is reported now, not after training
        from .eval.inception import resolve_weights_path

        inception_weights = resolve_weights_path(inception_weights)
    if teacher_obj is not None and config_resolution(cfg) is not None:
        raise UserError("resolution is an option of diffusers teachers loaded from a folder; a teacher object has its "
                        "sample_shape: drop resolution")
    teacher_model = teacher_obj if teacher_obj is not None else load_teacher(cfg.teacher,
                                                                             resolution=config_resolution(cfg))
    check_schedule_steps(cfg, teacher_model.schedule)  # before the data is prepared or anything trains
    if in_memory:  # checked against the teacher (shape, labels) before anything trains
        dataset = as_dataset(data, tuple(teacher_model.sample_shape), teacher_model.num_classes, need_labels=True)
        data_name = dataset.name
    else:
        data_name = cfg.data or model_data(teacher_model)
        if data_name is None:
            raise UserError(f"teacher {cfg.teacher!r} does not record its data; pass --data" if teacher_obj is None
                            else "a teacher object records no data; pass data= (a tensor, an (x, labels) pair, a "
                                 "Dataset, or a data set's name)")
        dataset = prepare_data(teacher_model, data_name)
    if tuple(dataset.sample_shape) != tuple(teacher_model.sample_shape):
        raise UserError(f"data {data_name!r} has samples of shape {tuple(dataset.sample_shape)} but the teacher "
                        f"makes {tuple(teacher_model.sample_shape)}")
    cfg = cfg.model_copy(update={"data": data_name})

    method_cls = registry()[method][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loop.seed)
        method_obj = method_cls(teacher_model, cfg)

    def student_of() -> Student:
        if hasattr(method_obj, "student"):  # a method with its own student sampler (Lightning: ODE steps)
            return method_obj.student()
        return Student(method_obj.inference_model(), method_obj.timesteps)

    sample_fn = _sample_writer(student_of, None if in_memory else data_name)  # in memory: no held-out split to draw
    if restart:  # everything is checked: only now is the earlier run moved aside
        set_aside(out)
    train(method_obj, dataset, cfg.loop, out, resume=resume, sample_fn=sample_fn, config=cfg)

    from accelerate import PartialState

    student = student_of().eval().requires_grad_(False)  # training is over: the student as it is saved
    meta = {"method": method, "teacher": cfg.teacher, "data": data_name, "steps": cfg.steps,
            "guidance_scale": config_guidance(cfg), "iterations": cfg.loop.iterations, "seed": cfg.loop.seed,
            **getattr(method_obj, "student_meta", {})}
    student.info = {"meta": meta}
    if PartialState().is_main_process:
        save_student(student, out / "student", **meta)
        if hasattr(method_obj, "save_outputs"):  # methods with more than one student (Lightning's ladder)
            method_obj.save_outputs(out, **meta)
        if evaluate_n > 0:  # every run gets its report; FID where a feature network is available
            from .report import write_run_report

            write_run_report(out, student, teacher_model, n=evaluate_n, inception_weights=inception_weights,
                             data=dataset if in_memory else data_name, cfg_scale=config_guidance(cfg))
    PartialState().wait_for_everyone()
    return student
