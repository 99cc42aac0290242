"""A user's own ``nn.Module`` as a fewstep teacher: :func:`wrap` (``fewstep.wrap``).

The module goes behind the network protocol of :mod:`fewstep.diffusion.denoiser` (:class:`ModuleNet`, an adapter
like :class:`fewstep.models.hf.DiffusersNet`) inside the one :class:`~fewstep.diffusion.denoiser.Denoiser`, so
samplers, every distillation method and the evaluation see it as they see fewstep's own networks. Three common kinds:

=================================================  =======================================================  ==========
the module                                         ``wrap(...)``                                            it gets
=================================================  =======================================================  ==========
EDM-style ``D(x, sigma, labels) -> x0`` (its own   ``schedule="edm", prediction="x0"``                      ``x_t``, sigma
preconditioning inside, as ``EDMPrecond``)
eps- or v-predictor on a DDPM ``t`` in [0, T-1]    ``schedule="ddpm", prediction="eps"`` (or ``"v"``)        ``x_t``, t
flow model on a time in [0, 1] (1 = noise)         ``schedule="flow", prediction="flow"``                   ``x_t``, t
=================================================  =======================================================  ==========

``inputs="raw"`` (the default) hands the module ``x_t`` itself and the schedule's native time (EDM: sigma; DDPM: the
timestep; flow: ``t`` in [0, 1], ``x_t = (1 - t) x0 + t eps``, velocity ``eps - x0``). ``inputs="preconditioned"``
hands it what fewstep's own networks get: ``c_in(t) x_t`` and ``c_noise(t)`` (EDM: ``x / sqrt(sigma^2 +
sigma_data^2)`` and ``ln(sigma) / 4``, for an EDM ``F`` network with ``prediction="edm"``; flow: ``1000 t``).

The condition: fewstep passes class indices ``(B,)``; ``condition`` says what the module takes: ``"index"`` (the
indices; ``null_class`` is the index it was trained to read as "no class", for classifier-free guidance),
``"onehot"`` (float ``(B, num_classes)``; the zero vector is the null, EDM's convention) or ``"embedding"`` (rows of
``embeddings``, a ``(num_classes, D)`` table, or ``(num_classes + 1, D)`` whose last row is the null). An
unconditional module (``num_classes=0``) is called as ``module(x, t)``, a conditional one as ``module(x, t, c)``.

``features`` (optional) is what DMD2's GAN head, Lightning's discriminator and ADD's ``feature_network: teacher`` read
(:meth:`Denoiser.features`): the name of a submodule, whose output in the forward pass is the feature (the pass stops
there), or a function ``features(module, x, t, c) -> (B, C[, H, W])`` of the module's own inputs. Without it those
options say so in one line; every other method and option runs.

Saving: the weights go to safetensors as for every denoiser; the JSON records the module's import path and
``init_args`` (its constructor's arguments) when ``init_args`` is given, so ``load_student(path)`` rebuilds it, and
otherwise ``load_student(path, module=YourNet(...))`` takes a freshly built module.
"""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import DDPMSchedule, EDMSchedule, FlowSchedule, Schedule, schedule_from_config
from ..errors import UserError

FORMAT = "module"
#: what ``prediction`` may say, and the prediction type of fewstep's schedules it is
PREDICTIONS = {"x0": "sample", "sample": "sample", "eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction",
               "v_prediction": "v_prediction", "flow": "flow", "velocity": "flow", "edm": "edm", "F": "edm"}
INPUTS = ("raw", "preconditioned")
CONDITIONS = ("index", "onehot", "embedding")
SCHEDULES = {"edm": EDMSchedule, "ddpm": DDPMSchedule, "flow": FlowSchedule}


def native_time(schedule: Schedule, c_noise: Tensor) -> Tensor:
    """The schedule's own time ``t`` back from the network input ``c_noise(t)`` (:meth:`Schedule.c_noise`)."""
    if schedule.kind == "edm":
        return (4 * c_noise.float()).exp()
    if schedule.kind == "flow":
        return c_noise.float() / schedule.num_train_timesteps
    assert schedule.kind == "ddpm", schedule.kind
    return c_noise.float()


class ModuleNet(nn.Module):
    """A user's module behind the network protocol: ``forward(x, c_noise, cond)``, ``features(x, c_noise, cond)``,
    ``null_cond(cond)`` (see :func:`wrap` for the arguments). Its weights are ``module.*`` (and ``embeddings``)."""

    def __init__(self, module: nn.Module, schedule: Schedule, inputs: str = "raw", num_classes: int = 0,
                 condition: str | None = None, null_class: int | None = None, embeddings: Tensor | None = None,
                 features: str | Callable[..., Tensor] | None = None, build: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.module = module
        self.schedule = schedule
        self.inputs = inputs
        self.num_classes = num_classes
        self.condition = condition if num_classes > 0 else None
        self.null_class = null_class
        if embeddings is not None:
            self.register_buffer("embeddings", embeddings.detach().float().clone())
        self._features = features
        self.build = build

    # --- conditions ------------------------------------------------------------------------------------------------
    @property
    def null_index(self) -> int | None:
        """The class index fewstep passes for "no class" (None: the module has no null condition)."""
        if self.condition == "index":
            return self.null_class
        if self.condition == "embedding" and self.embeddings.shape[0] == self.num_classes:
            return None
        return self.num_classes  # one-hot's zero vector, the embedding table's last row

    def null_cond(self, cond: Any) -> Any:
        if self.null_index is None:
            raise UserError("this wrapped module has no null condition, so classifier-free guidance cannot run; "
                            "use guidance_scale 1, or wrap it with null_class= (condition 'index') or an embedding "
                            "table with a null row")
        return torch.full_like(cond, self.null_index)

    def _cond(self, cond: Tensor | None, x: Tensor, probe: bool = False) -> Any:
        """What the module takes for fewstep's class indices ``cond`` (None: the null condition)."""
        if self.condition is None:
            return None
        if cond is None:
            if self.null_index is None and not probe:
                raise UserError("this wrapped module is class-conditional and has no null condition; pass class "
                                "labels (data=(x, labels)), or wrap it with null_class=")
            # a features probe without a condition (the heads' sizes): any class gives the shape
            cond = torch.full((x.shape[0],), 0 if self.null_index is None else self.null_index, device=x.device)
        cond = cond.to(x.device).long()
        if self.condition == "index":
            return cond
        if self.condition == "onehot":
            return nn.functional.one_hot(cond, self.num_classes + 1)[:, : self.num_classes].to(x.dtype)
        return self.embeddings[cond].to(x.dtype)

    # --- the module ------------------------------------------------------------------------------------------------
    def _inputs(self, x: Tensor, c_noise: Tensor) -> tuple[Tensor, Tensor]:
        if self.inputs == "preconditioned":
            return x, c_noise
        t = native_time(self.schedule, c_noise).to(x.device)
        c_in = self.schedule.c_in(t).to(x.device, x.dtype)
        return x / c_in.reshape(-1, *([1] * (x.ndim - 1))), t

    def _call(self, x: Tensor, c_noise: Tensor, cond: Any, probe: bool = False) -> Tensor:
        x, t = self._inputs(x, c_noise)
        c = self._cond(cond, x, probe)
        return self.module(x, t) if self.condition is None else self.module(x, t, c)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        return self._call(x, c_noise, cond)

    def features(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        if self._features is None:
            raise UserError("the wrapped module has no features (DMD2's GAN head, Lightning's discriminator and ADD's "
                            "feature_network 'teacher' read them): wrap it with features='<submodule name>' or a "
                            "function, or distill without them (DMD2: gan=False; ADD: feature_network='random')")
        if callable(self._features):
            x_in, t = self._inputs(x, c_noise)
            out = self._features(self.module, x_in, t, self._cond(cond, x_in, probe=True))
        else:
            from .hf import _run_until

            out = _run_until(self.module.get_submodule(self._features), lambda: self._call(x, c_noise, cond, True))
            out = out[0] if isinstance(out, (tuple, list)) else out
        if not torch.is_tensor(out) or out.ndim not in (2, 4):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"the wrapped module's features must be (B, C) or (B, C, H, W), got {got}; point "
                            "features= at a layer with such an output")
        return out

    # --- saving ---------------------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What :func:`denoiser_from_description` needs to rebuild this network (weights apart)."""
        emb = getattr(self, "embeddings", None)
        return {"type": FORMAT, **(self.build or {"module": None, "init_args": None}), "inputs": self.inputs,
                "num_classes": self.num_classes, "condition": self.condition, "null_class": self.null_class,
                "embeddings_shape": None if emb is None else list(emb.shape),
                "features": self._features if isinstance(self._features, str) else None}


def _schedule(schedule: Any) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]()
    if isinstance(schedule, dict):
        try:
            return schedule_from_config(schedule)
        except (TypeError, ValueError) as e:
            raise UserError(f"schedule: {e}") from None
    raise UserError(f"schedule {schedule!r} is not one fewstep knows; pass 'edm', 'ddpm', 'flow', a schedule config "
                    "dict (e.g. {'kind': 'edm', 'sigma_data': 0.5}) or a fewstep.diffusion.schedule.Schedule")


def _build_record(module: nn.Module, init_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"module": "pkg.mod:Class", "init_args": {...}}`` (how a saved copy is rebuilt), or None without
    ``init_args``."""
    if init_args is None:
        return None
    cls = type(module)
    if "<locals>" in cls.__qualname__:
        raise UserError(f"{cls.__qualname__} is defined inside a function, so a saved copy cannot be rebuilt from "
                        "its import path; define the class at module level, or drop init_args and pass "
                        "load_student(path, module=...) a fresh module")
    try:
        json.dumps(init_args)
    except (TypeError, ValueError) as e:
        raise UserError(f"init_args must be JSON values (numbers, strings, lists, dicts), as the saved JSON records "
                        f"them ({e}); drop init_args and pass load_student(path, module=...) a fresh module") from None
    return {"module": f"{cls.__module__}:{cls.__qualname__}", "init_args": dict(init_args)}


def wrap(
    module: nn.Module,
    *,
    schedule: str | dict[str, Any] | Schedule,
    prediction: str,
    sample_shape: tuple[int, ...] | list[int],
    num_classes: int = 0,
    inputs: str = "raw",
    condition: str | None = None,
    null_class: int | None = None,
    embeddings: Tensor | None = None,
    features: str | Callable[..., Tensor] | None = None,
    init_args: dict[str, Any] | None = None,
) -> Denoiser:
    """A plain ``nn.Module`` as a fewstep teacher (a :class:`Denoiser`), in one call (module docstring).

    Args:
        module: the network (trained; it is used as it is, not copied).
        schedule: the noise schedule it was trained with: ``"edm"``, ``"ddpm"`` (T = 1000, linear betas),
            ``"flow"``, a schedule config dict (``{"kind": "edm", "sigma_data": 0.5}``) or a ``Schedule``.
        prediction: what it returns: ``"x0"``, ``"eps"``, ``"v"``, ``"flow"`` (velocity ``eps - x0``) or ``"edm"``
            (EDM's ``F``, with ``D = c_skip x + c_out F``).
        sample_shape: the shape of one sample, ``(D,)`` or ``(C, H, W)``.
        num_classes: classes of a class-conditional module (0: unconditional).
        inputs: ``"raw"`` (``x_t`` and the schedule's native time) or ``"preconditioned"`` (``c_in x_t`` and
            ``c_noise``).
        condition: how it takes the class: ``"index"`` (default), ``"onehot"`` or ``"embedding"``.
        null_class: ``condition="index"``: the index it reads as "no class" (classifier-free guidance).
        embeddings: ``condition="embedding"``: the table ``(num_classes[+1], D)`` of what it takes per class.
        features: a submodule name or ``features(module, x, t, c)`` (module docstring); optional.
        init_args: the arguments ``type(module)(**init_args)`` rebuilds it from (JSON values): saved students then
            load without a module.

    Returns:
        The denoiser, in eval mode without gradients (as a loaded teacher).
    """
    if not isinstance(module, nn.Module):
        raise UserError(f"fewstep.wrap takes a torch.nn.Module, not a {type(module).__name__}")
    sched = _schedule(schedule)
    if prediction not in PREDICTIONS:
        raise UserError(f"prediction {prediction!r} is not one fewstep knows; pass one of "
                        f"{', '.join(PREDICTIONS)}")
    if inputs not in INPUTS:
        raise UserError(f"inputs {inputs!r} is not one fewstep knows; pass 'raw' (x_t and the schedule's own time) "
                        "or 'preconditioned' (c_in x_t and c_noise)")
    try:
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise UserError(f"sample_shape must be (D,) for vectors or (C, H, W) for images, not {sample_shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise UserError(f"num_classes must be a whole number >= 0 (0: unconditional), not {num_classes!r}")
    if num_classes == 0 and (condition is not None or null_class is not None or embeddings is not None):
        raise UserError("condition, null_class and embeddings are for class-conditional modules; pass num_classes=K "
                        "(the number of classes) or drop them")
    condition = condition or ("index" if num_classes > 0 else None)
    if condition is not None and condition not in CONDITIONS:
        raise UserError(f"condition {condition!r} is not one fewstep knows; pass 'index' (class indices), 'onehot' "
                        "or 'embedding' (with embeddings=)")
    if null_class is not None and condition != "index":
        raise UserError(f"null_class is for condition 'index'; with {condition!r} the null is "
                        + ("the zero vector" if condition == "onehot" else "the embedding table's last row"))
    if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0):
        raise UserError(f"null_class must be a class index >= 0, not {null_class!r}")
    if (condition == "embedding") != (embeddings is not None):
        raise UserError("condition 'embedding' takes embeddings=<(num_classes[+1], D) tensor> and only it does; "
                        "pass both or neither")
    if embeddings is not None:
        embeddings = torch.as_tensor(embeddings)
        if embeddings.ndim < 2 or embeddings.shape[0] not in (num_classes, num_classes + 1):
            raise UserError(f"embeddings must be a table of {num_classes} (or {num_classes + 1}, the last the null) "
                            f"rows, got shape {tuple(embeddings.shape)}")
    if features is not None and not callable(features):
        if not isinstance(features, str):
            raise UserError("features must be the name of a submodule or a function features(module, x, t, c)")
        try:
            module.get_submodule(features)
        except AttributeError:
            raise UserError(f"the module has no submodule {features!r}; pass one of its named_modules() names, or a "
                            "function features(module, x, t, c)") from None
    net = ModuleNet(module, sched, inputs, num_classes, condition, null_class, embeddings, features,
                    _build_record(module, init_args))
    den = Denoiser(net, sched, PREDICTIONS[prediction], shape, num_classes)
    _probe(den)
    den.info = {"meta": {"kind": "teacher", "module": f"{type(module).__module__}.{type(module).__qualname__}"}}
    return den.eval().requires_grad_(False)


def _probe(den: Denoiser) -> None:
    """One call on two noise samples at the noisiest time: a module that does not take these inputs, or returns
    another shape, is reported now, not in the middle of a run."""
    net: ModuleNet = den.net  # type: ignore[assignment]
    device = next(iter(net.parameters()), torch.empty(0)).device
    x = torch.zeros((2, *den.sample_shape), device=device)
    cond = torch.zeros(2, dtype=torch.long, device=device) if net.condition is not None else None
    call = f"module(x, {'sigma' if den.schedule.kind == 'edm' else 't'}{', c' if cond is not None else ''})"
    try:
        with torch.no_grad():
            out = den.raw(x, torch.full((2,), den.schedule.t_max, device=device), cond)
    except UserError:
        raise
    except Exception as e:  # the user's code: any error it raises
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"calling the wrapped module as {call} failed ({type(e).__name__}: {msg}); check "
                        "num_classes, condition, inputs and sample_shape against its forward") from None
    if not torch.is_tensor(out) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"the wrapped module returns {got} for inputs of shape {tuple(x.shape)}; it must return a "
                        "prediction of the input's shape (pass sample_shape= the shape of one sample)")


def denoiser_from_description(desc: dict[str, Any], module: nn.Module | None = None) -> Denoiser:
    """Rebuild a saved wrapped module's denoiser (weights apart) from its JSON, or around ``module``."""
    spec = desc["network"]
    if module is None:
        path = spec.get("module")
        if not path:
            raise UserError("this model's network is a module that was wrapped without init_args, so fewstep cannot "
                            "rebuild it; pass a freshly built one: load_student(path, module=YourNet(...))")
        mod_name, _, qualname = path.partition(":")
        try:
            cls: Any = importlib.import_module(mod_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            module = cls(**(spec.get("init_args") or {}))
        except Exception as e:  # the user's code: import errors, constructor errors
            msg = " ".join(str(e).split())[:200]
            raise UserError(f"cannot rebuild the wrapped module {path} ({type(e).__name__}: {msg}); make it "
                            "importable, or pass load_student(path, module=YourNet(...))") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"module must be a torch.nn.Module, not a {type(module).__name__}")
    schedule = schedule_from_config(desc["schedule"])
    emb_shape = spec.get("embeddings_shape")
    embeddings = torch.zeros(emb_shape) if emb_shape else None  # the saved table is loaded over it
    net = ModuleNet(module, schedule, spec["inputs"], int(spec["num_classes"]), spec.get("condition"),
                    spec.get("null_class"), embeddings, spec.get("features"),
                    {"module": spec.get("module"), "init_args": spec.get("init_args")} if spec.get("module") else None)
    return Denoiser(net, schedule, desc["prediction_type"], tuple(desc["sample_shape"]), int(desc["num_classes"]))


__all__ = ["ModuleNet", "wrap", "denoiser_from_description", "native_time"]
