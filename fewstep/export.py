"""Export a student distilled from a diffusers teacher: a diffusers pipeline folder, or a LoRA for the teacher pipeline.

``fewstep export --student RUN --format diffusers|lora --out DIR`` (Python: :func:`export`).

**diffusers** writes the teacher's pipeline with the student's weights and a scheduler that *is* our k-step student
sampler (:func:`fewstep.diffusion.samplers.sample_student`: predict ``x0``, re-noise it with fresh noise to the next
time, repeat), so ``DiffusionPipeline.from_pretrained(DIR)(..., num_inference_steps=k)`` samples as we do:

* DDPM-family teachers get an ``LCMScheduler``. Its multistep step is exactly ours (denoise, then
  ``x = sqrt(abar_next) x0 + sqrt(1 - abar_next) z`` with fresh ``z``; the last step returns ``x0``); its consistency
  boundary scalings ``c_skip, c_out`` are switched off with a huge ``timestep_scaling`` (``c_skip < 1e-12``), and with
  ``original_inference_steps = k`` its timesteps ``[j T/k - 1]`` are our trailing ones whenever ``k`` divides ``T``
  (k = 1, 2, 4, 5, 8 for T = 1000). For other ``k`` the folder's ``fewstep_export.json`` (and README.md) lists the
  exact timesteps to pass as ``pipe(timesteps=...)``.
* Flow-matching teachers (SD3, Flux) get their ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True``
  (denoise, re-noise to the next sigma with fresh noise). The student's times are ``shift(linspace(1, 1/k, k))``:
  Flux's pipeline passes exactly those sigmas; SD3's needs ``pipe(sigmas=list(np.linspace(1, 1/k, k)))`` for k > 1
  (written into ``fewstep_export.json`` as ``pass_sigmas``).

Lightning's students take deterministic ODE steps instead (``x0_hat``, then the DDIM step to the next time): they get
a ``DDIMScheduler`` with ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True`` (flow: the deterministic
``FlowMatchEulerDiscreteScheduler``, the same step).

One difference is by design: diffusers starts from ``z`` (``init_noise_sigma = 1``) where our sampler starts from
``sigma_{t_1} z`` (0.998 z on SD's schedule at t = 999, exactly z on zero-terminal-SNR and flow schedules). Prompts
were distilled with CFG baked in: call the pipeline with ``guidance_scale=1`` (DiT: ``guidance_scale=1``).

**lora** writes ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(DIR)`` accepts on the original
teacher pipeline (pipelines with a LoRA loader: Stable Diffusion 1.x/2.x, SDXL, SD3, Flux), plus the scheduler in
``DIR/scheduler`` to swap in (``pipe.scheduler = LCMScheduler.from_pretrained(DIR, subfolder="scheduler")``):

* a student trained as a LoRA (PEFT adapters in its network) exports its adapters as they are;
* a student trained as full weights is approximated by a truncated SVD of each Linear/Conv2d weight difference
  ``W_student - W_teacher = U S V^T ~ (U_r S_r) V_r^T`` (``B = U_r S_r``, ``A = V_r^T``, scale 1). Biases,
  normalisation and embedding changes cannot be carried by a LoRA; ``fewstep_export.json`` reports the share of the
  weight change that is left out (``lora_residual``, 0 = exact).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .io import atomic_write_json, atomic_write_text, check_writable
from .models.lora import low_rank
from .options import EXPORT_FORMATS as FORMATS

#: LCM's boundary-condition time scale; this large, c_skip = 0 and c_out = 1 to float precision for t >= 1
TIMESTEP_SCALING = 1.0e6


def _load_student(student: Any) -> Any:
    from .student import Student

    if isinstance(student, Student):
        return student
    from .api import load_model

    model = load_model(student)
    if not isinstance(model, Student):
        raise UserError(f"{student} is a teacher, not a student; give the run directory of `fewstep distill`")
    return model


def _diffusers_generator(student: Any) -> Any:
    from .models.hf import DiffusersDenoiser

    den = student.generator
    if not isinstance(den, DiffusersDenoiser):
        raise UserError(f"export needs a student distilled from a diffusers teacher; this one is fewstep's embedded "
                        f"{type(den.net).__name__} network, which diffusers cannot load (sample it with `fewstep "
                        "sample`)")
    return den


def _plain_model(den: Any) -> nn.Module:
    """The student's diffusers model with any LoRA adapters merged into its weights (a copy)."""
    net = copy.deepcopy(den.net)
    if any(".lora_A." in n for n, _ in net.named_parameters()):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in net.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        _strip_lora(net)
    return net.model.float().eval().requires_grad_(False)


def _strip_lora(net: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, module.get_base_layer())


# ----------------------------------------------------------------------------------------------------------------
# The scheduler that is our student sampler
# ----------------------------------------------------------------------------------------------------------------
def student_scheduler(den: Any, timesteps: Tensor, base_config: dict[str, Any], ode: bool = False
                      ) -> tuple[Any, list[float] | None]:
    """A diffusers scheduler that runs the k-step student sampler (see the module docstring), and the timesteps to
    pass explicitly when its ``set_timesteps(k)`` does not give the student's own (else None).

    ``ode``: the student takes deterministic ODE steps (Lightning's students: DDIM from ``x0_hat`` to the next time),
    so the scheduler is DDIM with trailing spacing (flow: the deterministic flow-matching Euler step)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

    k = len(timesteps)
    ts = [float(t) for t in timesteps]
    if den.schedule.kind == "flow":
        cfg = {key: v for key, v in base_config.items() if not key.startswith("_")}
        sched = FlowMatchEulerDiscreteScheduler.from_config({**cfg, "stochastic_sampling": not ode})
        if sched.config.get("use_dynamic_shifting"):
            return sched, None  # Flux: the pipeline passes sigmas = linspace(1, 1/k, k) and mu for the resolution
        sched.set_timesteps(k)
        same = torch.allclose(sched.sigmas[:-1].float(), timesteps.float().cpu(), atol=1e-5)
        # else: the unshifted sigmas to pass as pipe(sigmas=...) (the scheduler shifts them)
        return sched, None if same else [float(u) for u in torch.linspace(1.0, 1.0 / k, k)]
    s = den.schedule
    if ode:  # trailing DDIM; set_alpha_to_one: the last step goes to the clean sample, as our t_clean
        sched = DDIMScheduler(
            num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
            beta_schedule=s.beta_schedule, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
            prediction_type=den.prediction_type, thresholding=False, timestep_spacing="trailing",
            rescale_betas_zero_snr=s.rescale_zero_snr)
        sched.set_timesteps(k)
        same = [int(t) for t in sched.timesteps] == [int(round(t)) for t in ts]
        return sched, None if same and s.num_train_timesteps % k == 0 else [int(round(t)) for t in ts]
    sched = LCMScheduler(
        num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule=s.beta_schedule, original_inference_steps=k, clip_sample=False, set_alpha_to_one=True,
        steps_offset=0, prediction_type=den.prediction_type, thresholding=False, timestep_spacing="leading",
        timestep_scaling=TIMESTEP_SCALING, rescale_betas_zero_snr=s.rescale_zero_snr)
    sched.set_timesteps(k)
    same = [int(t) for t in sched.timesteps] == [int(round(t)) for t in ts]
    return sched, None if same else [int(round(t)) for t in ts]


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------
def lora_from_difference(student: nn.Module, teacher: nn.Module, rank: int, atol: float = 0.0
                         ) -> tuple[dict[str, Tensor], float]:
    """PEFT-format LoRA weights (``<layer>.lora_A.weight``, ``<layer>.lora_B.weight``) approximating
    ``student - teacher`` on every Linear/Conv2d by a rank-``rank`` truncated SVD, and the share of the total weight
    change (Frobenius norm over every parameter) that they leave out."""
    teacher_mods = dict(teacher.named_modules())
    state: dict[str, Tensor] = {}
    left, total = 0.0, 0.0
    covered: set[str] = set()
    for name, m in student.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name:
            continue
        t = teacher_mods[name]
        delta = (m.weight.detach().double() - t.weight.detach().double())
        covered.add(f"{name}.weight")
        if float(delta.abs().max()) <= atol:
            continue
        a, b, dropped = low_rank(delta, rank)
        left += dropped
        state[f"{name}.lora_A.weight"] = a.float().contiguous()
        state[f"{name}.lora_B.weight"] = b.float().contiguous()
    t_params = dict(teacher.named_parameters())
    for pname, p in student.named_parameters():
        d = float((p.detach().double() - t_params[pname].detach().double()).pow(2).sum())
        total += d
        if pname not in covered:
            left += d
    return state, (left / total) ** 0.5 if total > 0 else 0.0


def lora_of_student(den: Any) -> dict[str, Tensor] | None:
    """The PEFT adapters of a LoRA-trained student, keyed as the diffusers model's modules (None: not a LoRA).

    Each ``B`` carries its layer's scale ``alpha / r``, so the file is exact when loaded at scale 1 (diffusers'
    ``load_lora_weights`` without alphas)."""
    if not any(".lora_A." in n for n, _ in den.net.named_parameters()):
        return None
    from peft.utils import get_peft_model_state_dict

    from .models.lora import ADAPTER

    scales = {name: float(m.scaling[ADAPTER]) for name, m in den.net.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and ADAPTER in m.scaling}
    state = get_peft_model_state_dict(den.net)
    out = {}
    for k, v in state.items():
        v = v.detach().float().cpu()
        if ".lora_B." in k:
            v = v * scales[k.split(".lora_B.")[0]]
        out[k.removeprefix("model.")] = v.contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------
def export(student: Any, format: str = "diffusers", out: str | Path = "export", rank: int = 64) -> Path:
    """Export a distilled student for diffusers.

    Args:
        student: a ``fewstep distill`` run directory (or its ``student.json``), or a :class:`~fewstep.Student`.
        format: ``diffusers`` (a pipeline folder) or ``lora`` (LoRA weights for the teacher pipeline).
        out: the folder to write (must not exist).
        rank: the LoRA rank of a full-weight student's SVD extraction (``lora`` only).

    Returns:
        ``out``.
    """
    from .models.hf import DENOISER_COMPONENTS, _model_class

    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; use diffusers or lora")
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new --out (exports are never overwritten)")
    check_writable(out)  # before loading anything
    st = _load_student(student)
    den = _diffusers_generator(st)
    comps = den.components
    folder = comps.folder
    model = _plain_model(den)
    pipeline = (folder / "model_index.json").is_file()
    info: dict[str, Any] = {"format": format, "steps": st.steps, "timesteps": [float(t) for t in st.timesteps],
                            "teacher": str(folder), "prediction_type": den.prediction_type,
                            "schedule": den.schedule.to_config(), "guidance_scale": 1.0}
    if pipeline:
        index = json.loads((folder / "model_index.json").read_text())
        name = next(n for n in DENOISER_COMPONENTS if n in index and index[n][1])
        base_sched = dict(comps.pipe.scheduler.config)
        absent = _absent_components(index, type(comps.pipe))
        if absent:  # e.g. the shapes teacher's StableDiffusionPipeline without VAE
            info["load_kwargs"] = dict.fromkeys(absent)
        if not den.latent and hasattr(comps.pipe, "vae"):  # a pixel-space pipeline that expects a VAE
            info["output_type"] = "latent"
    else:
        name = "unet" if den.net.family == "unet" else "transformer"
        base_sched = json.loads(next(p for p in (folder / "scheduler_config.json",
                                                 folder.parent / "scheduler" / "scheduler_config.json")
                                     if p.is_file()).read_text())
    ode = getattr(st, "sampler", None) == "ode" or st.info.get("meta", {}).get("sampler") == "ode"
    sched, explicit = student_scheduler(den, st.timesteps, base_sched, ode=ode)
    info["sampler"] = "ode" if ode else "renoise"
    info["scheduler"] = type(sched).__name__
    if explicit is not None:
        info["pass_sigmas" if den.schedule.kind == "flow" else "pass_timesteps"] = explicit
    if format == "diffusers":
        def write(folder_out: Path) -> None:
            _export_pipeline(den, model, name, sched, folder_out, pipeline)
    else:
        if not pipeline:
            raise UserError(f"{folder} is a bare model folder; a LoRA is loaded into a pipeline "
                            "(pipe.load_lora_weights) -- distill from the pipeline folder, or use --format diffusers")
        pipe_cls = type(comps.pipe)
        if not hasattr(pipe_cls, "save_lora_weights"):
            raise UserError(f"{pipe_cls.__name__} has no LoRA loader (load_lora_weights); use --format diffusers")
        lora = lora_of_student(den)
        if lora is not None:
            info.update(lora_source="adapters", lora_residual=0.0)
        else:
            teacher_model = _model_class(type(model).__name__).from_pretrained(str(folder / name),
                                                                               local_files_only=True)
            lora, residual = lora_from_difference(model, teacher_model.float(), rank)
            info.update(lora_source="svd", rank=rank, lora_residual=residual)
            if not lora:
                raise UserError("the student's Linear/Conv2d weights equal the teacher's; there is no LoRA to export")

        def write(folder_out: Path) -> None:
            pipe_cls.save_lora_weights(str(folder_out), **{f"{name}_lora_layers": lora}, safe_serialization=True)
            sched.save_pretrained(str(folder_out / "scheduler"))

    return _write_folder(out, lambda tmp: (write(tmp), atomic_write_json(tmp / "fewstep_export.json", info),
                                           atomic_write_text(tmp / "README.md", _card(info, name))))


def _absent_components(index: dict[str, Any], pipe_cls: type) -> list[str]:
    """The components ``model_index.json`` leaves out (``[null, null]``) that ``pipe_cls`` requires (taken without a
    default, not among its ``_optional_components``): ``DiffusionPipeline.from_pretrained`` must be passed them as
    ``None``."""
    import inspect

    params = inspect.signature(pipe_cls.__init__).parameters
    optional = set(getattr(pipe_cls, "_optional_components", []))
    return [k for k, v in index.items() if isinstance(v, list) and v[:1] == [None] and k in params
            and params[k].default is inspect.Parameter.empty and k not in optional]


def _write_folder(out: Path, write: Any) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``out``, then rename it to ``out``: an export is there
    whole or not at all (a full disk or an error on the way removes the temporary folder; one line names ``out``)."""
    import shutil
    import tempfile

    from .io import write_error

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        write(tmp)
        tmp.rename(out)  # POSIX refuses to rename over a folder that is not empty: no export is overwritten
        tmp = None
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_pipeline(den: Any, model: nn.Module, name: str, sched: Any, out: Path, pipeline: bool) -> None:
    from .models.hf import load_pipeline

    folder = den.components.folder
    if pipeline:
        pipe = load_pipeline(folder, **{name: model})
        pipe.scheduler = sched
        pipe.register_to_config(scheduler=(sched.__module__.split(".")[0], type(sched).__name__))
        pipe.save_pretrained(str(out))
    elif den.net.family == "unet":
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=model, scheduler=sched).save_pretrained(str(out))
    else:  # a bare transformer without a VAE: the model and its scheduler side by side
        model.save_pretrained(str(out))
        sched.save_config(str(out))


def _card(info: dict[str, Any], name: str) -> str:
    steps = info["steps"]
    extra = "".join(f", {key[5:]}={info[key]}" for key in ("pass_timesteps", "pass_sigmas") if key in info)
    load = "".join(f", {k}=None" for k in info.get("load_kwargs", {}))  # components diffusers must be told are absent
    if "output_type" in info:  # no VAE: the pipeline's latents are the images
        extra += f", output_type={info['output_type']!r}"
    note = ("\nWithout a VAE the pipeline's latents are the images: `output_type=\"latent\"` returns them as tensors "
            "`(N, C, H, W)` in [-1, 1].\n" if "output_type" in info else "")
    if info["format"] == "diffusers":
        use = (f"```python\nfrom diffusers import DiffusionPipeline\n"
               f"pipe = DiffusionPipeline.from_pretrained(DIR{load})\n"
               f"images = pipe(..., num_inference_steps={steps}, guidance_scale=1.0{extra}).images\n```\n{note}")
    else:
        use = (f"```python\npipe = DiffusionPipeline.from_pretrained(\"{info['teacher']}\"{load})\n"
               f"pipe.load_lora_weights(DIR)\npipe.scheduler = {info['scheduler']}.from_pretrained(DIR, "
               f"subfolder=\"scheduler\")\nimages = pipe(..., num_inference_steps={steps}, guidance_scale=1.0{extra})"
               f".images\n```\n{note}")
    return (f"# fewstep {steps}-step student ({info['format']})\n\nDistilled from `{info['teacher']}` with fewstep; "
            f"sampled by `{info['scheduler']}` as fewstep's {steps}-step student sampler.\n\n{use}")


__all__ = ["export", "student_scheduler", "lora_from_difference", "lora_of_student", "FORMATS"]
