"""SDXL-Lightning: progressive adversarial distillation with LoRA stages (Lin et al. 2024; METHODS.md, "SDXL-Lightning").

A student learns to jump from ``x_t`` to ``x_{t-ns}`` in one step where its stage's teacher takes ``n`` steps of size
``s``. The student is an ODE sampler (it follows the teacher's flow): its step is the deterministic DDIM update
``x_{t'} = alpha' x0_hat + sigma' (x_t - alpha x0_hat) / sigma`` with ``x0_hat = G(x_t, t, c)``, so a Lightning student
samples with :class:`LightningStudent` (DDIM between its timesteps), not with the re-noising k-step sampler of
DMD2/ADD students.

**The ladder.** ``ladder`` lists the students' step counts, one *stage* each, e.g. ``[8, 4, 2, 1]``. The first
``mse_stages`` stages are progressive MSE distillation; the others are adversarial. Stage 1's teacher is the frozen
teacher with CFG baked in (``guidance_scale``), run for ``teacher_steps / k`` steps of ``teacher_sampler`` over each
student step; every later stage's teacher is the previous stage's finished student, run for ``k_prev / k`` of its own
(ODE) steps -- progressive distillation. The paper: 128 -> 32 by MSE, then 32 -> 8 -> 4 -> 2 -> 1 adversarially;
ours for the small embedded teachers (good at ~32 Heun steps): 32 -> 8 by MSE, then 8 -> 4 -> 2 -> 1.

* **MSE** (progressive distillation, Salimans & Ho 2022): the teacher's ``x_{t'}`` is turned into the ``x0`` a DDIM
  step would need to land on it, ``x0* = (x_{t'} - (sigma'/sigma) x_t) / (alpha' - sigma' alpha / sigma)``
  (:func:`ddim_x0_target`), and ``|| G(x_t) - x0* ||^2`` is minimised -- the student's one DDIM step then reproduces
  the teacher's n steps exactly where the loss is zero (tested on a linear-Gaussian teacher).
* **Adversarial**: discriminator ``d`` = a trainable copy of the teacher's encoder + mid block
  (:meth:`Denoiser.features`) with small heads (:class:`~fewstep.models.discriminators.FeatureHead`).
  Conditional: ``p = sigma(head_c(d(x_{t'}, t', c), d(x_t, t, c)))`` (features concatenated over channels);
  unconditional: ``p' = sigma(head_u(d(x_{t'}, t', c)))``. Non-saturating: ``L_D = -log p - log(1 - p_hat)``,
  ``L_G = -log p_hat``.
* **Per adversarial stage** (``objective: full``): a LoRA (PEFT, rank ``lora_rank``) trained with the conditional
  objective, continued with the unconditional one, merged into the weights, then the full network fine-tuned with
  the unconditional objective. Ablations: ``objective: conditional`` (LoRA and full fine-tuning both conditional) and
  ``objective: mse_only`` (every stage MSE: plain progressive distillation).
* **Stabilisers**: students of ``<= multi_timestep_max_steps`` steps train from several start times
  (``multi_timesteps`` trailing times: 999, 749, 499, 249, the paper's {250, 500, 750, 1000}) to ``t - T/k``
  (clamped to clean); in the 1-step stage both ``x0``'s are re-noised to ``t*`` in ``renoise_fractions`` x T
  ({10, 250, 500, 750}) before discrimination; the 1-step student predicts ``x0``.

**Stages inside one training loop.** The loop trains one method over ``loop.iterations``; this method splits them
into *phases* (``mse``, ``lora_cond``, ``lora_uncond``, ``full_cond``, ``full_uncond``) in proportion to
``phase_weights`` and switches phase inside :meth:`updates` at the first iteration of the next phase, after the loop
has reseeded the RNGs. This keeps checkpoints and resume honest without a second run directory: the generator's
module has one fixed structure for the whole run (the network with LoRA adapters injected once; "merging" folds the
adapters into the base weights and re-initialises them to a zero update, and in the full phases the adapters are
switched off), so every checkpoint loads into a freshly built method; the phase index and the finished students of
earlier stages (plain state dicts, which are also the later stages' teachers) are ``extra_state``. A finished stage
leaves the GPU: in a run it is written once to ``<run>/stages/steps_<k>.safetensors`` and checkpoints carry its name
and SHA-256 only (without a run directory: CPU tensors); the next stage's teacher is rebuilt from it as a frozen copy
of the teacher network, in the dtype the loop holds the teacher in (bf16 under mixed precision). A phase switch
clears the optimizers' moments and sets the phase's learning rate; an adversarial stage also restarts the
discriminator from the teacher's weights and the heads' initial weights (fixed at construction from the seed).
Because the switch happens at the same iteration with the same reseeded RNG, a resumed run replays it bit-for-bit
(tested). (The alternative, one loop per stage into sub-directories, would split metrics, samples and checkpoints
over several run directories and need a second resume protocol in ``distill``.)

**Outputs** (:meth:`LightningMethod.save_outputs`, in ``<run>/students/``): for every stage's student
``steps_<k>.safetensors`` + ``.json`` (full weights; ``fewstep.methods.lightning.load_student`` samples it with ODE
steps) and ``lora_steps_<k>/`` -- the difference from the teacher as a PEFT LoRA (``adapter_config.json``,
``adapter_model.safetensors``, the weight differences of every Linear/Conv layer factorised by SVD at rank
``lora_export_rank``) plus ``full_tensors.safetensors`` (the differences of biases, norms and embeddings, which a LoRA
cannot carry) and ``lora.json`` (rank, relative error of the factorisation); :func:`apply_lora` puts it on the teacher.
The run's own ``student.*`` is the last stage's (``steps``) student, as for every method.

Choices where the paper is silent (or its scale is not ours):

* Training inputs ``x_t`` are noised real data (the paper distils on LAION images); one start time per batch.
* The discriminator's backbone is trained (at ``lr_discriminator``), with the heads; ``lr_discriminator: 0`` makes
  the backbone the frozen teacher itself (no copy, no optimizer state, not in checkpoints); the real/fake features at clean
  ``x0`` (the last step of a multi-step student) are taken at ``t = t_min``.
* The 1-step student's ``x0``-prediction: our teachers predict ``v`` (or flow, EDM's F, x0), whose ``x0`` reading is
  already well defined at ``t = T`` under zero terminal SNR (``x0 = -v``), so nothing changes for them; an
  ``epsilon`` teacher's 1-step student switches its network's output to be read as ``x0`` (``prediction_type``
  ``sample``), the paper's switch.
* Constant learning rates per phase (no warm-up: each phase continues from trained weights), AdamW betas (0, 0.99),
  the LoRA at 10x the full network's rate, the heads at 10x the backbone's.
* The stabilisers default to the paper's, but the shipped configs scale them down for 8x8 digits and a 10-minute CPU
  budget (``multi_timestep_max_steps: 0``, ``renoise_fractions: [0.01]``): with the paper's, 3/4 of the 1-step
  stage's batches start at t <= 749, where the 2-step teacher and the 1-step student nearly agree, and re-noising to
  t* >= 250 hides most of what still differs on 8x8 images -- the discriminator stayed near chance (loss 1.39 ->
  ~1.15 in 80 updates, against 0.24 without them). ``benchmarks/lightning.py`` measures both.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from ..config import RESOLUTION_DESCRIPTION, STRICT, TEACHER_DESCRIPTION, LoopConfig, _default_distill_loop
from ..diffusion.denoiser import Denoiser, guided
from ..diffusion.samplers import sample_ddim, sample_heun, student_timesteps
from ..diffusion.schedule import Schedule, bcast
from ..errors import UserError
from ..io import atomic_write, atomic_write_json
from ..models.discriminators import FeatureHead, nonsaturating_d_loss, nonsaturating_g_loss
from ..models.lora import ADAPTER, low_rank, lora_targets
from ..options import MAX_LR, MAX_RESOLUTION
from ..student import ODEStudent as LightningStudent, load_student
from .base import Batch, Method, Player, batch_cond
from .dmd2 import Generator, _unwrap

PHASES = ("mse", "lora_cond", "lora_uncond", "full_cond", "full_uncond")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def _default_lightning_loop() -> LoopConfig:
    return _default_distill_loop().model_copy(update={"iterations": 1200, "sample_every": 300, "checkpoint_every": 300})


class LightningConfig(BaseModel):
    """SDXL-Lightning (Lin et al. 2024): progressive distillation down a ladder of step counts, MSE for the first
    stage(s), then adversarial stages with a discriminator on the teacher's encoder, each a LoRA (conditional, then
    unconditional objective), merged, then full fine-tuning. Ablations: ``objective: mse_only`` and
    ``objective: conditional``."""

    model_config = STRICT

    method: Literal["lightning"] = Field("lightning", description="The distillation method.")
    teacher: str = Field("digits", description=TEACHER_DESCRIPTION)
    data: str | None = Field(None, description="Data noised into the students' inputs x_t (default: the teacher's).")
    resolution: int | None = Field(None, ge=1, le=MAX_RESOLUTION, description=RESOLUTION_DESCRIPTION)
    steps: int = Field(
        1, ge=1, le=8,
        description="Steps of the final student (one of `ladder`; the ladder stops there). Every stage's student down "
                    "to it is saved in <run>/students/.")
    ladder: list[int] = Field(
        [8, 4, 2, 1],
        description="Student steps of each stage, decreasing; each divides the one before it (and the first divides "
                    "teacher_steps). Paper: [32, 8, 4, 2, 1] from a 128-step teacher; ours for teachers good at ~32 "
                    "steps: [8, 4, 2, 1].")
    teacher_steps: int = Field(
        32, ge=1, description="N: the teacher's steps the first stage distils (paper: 128). Each of the first stage's "
                              "student steps matches N / ladder[0] teacher steps over the same span.")
    teacher_sampler: Literal["heun", "ddim"] = Field(
        "heun", description="The teacher's ODE solver over a student step in the first stage (heun: 2 NFE a step).")
    guidance_scale: float = Field(
        1.0, ge=1.0, description="CFG scale of the teacher in the first stage (baked into the student; 1 = none).")
    mse_stages: int = Field(1, ge=0, description="How many leading stages use the MSE objective (paper: 1).")
    objective: Literal["full", "conditional", "mse_only"] = Field(
        "full",
        description="Adversarial stages: 'full' = LoRA conditional -> LoRA unconditional -> merge -> full network "
                    "unconditional (the paper); 'conditional' = LoRA conditional -> merge -> full network "
                    "conditional; 'mse_only' = every stage MSE (progressive distillation).")
    phase_weights: dict[str, float] = Field(
        {"mse": 3.0, "lora_cond": 1.0, "lora_uncond": 0.5, "full_cond": 1.5, "full_uncond": 1.5},
        description="Relative iterations of each phase kind; loop.iterations is split over the run's phases in "
                    "proportion (every phase gets at least one).")
    stage_weights: list[float] | None = Field(
        None,
        description="Relative iterations of each stage of the ladder (multiplying phase_weights; None = equal). The "
                    "1-step stage, the hardest jump, may deserve more, e.g. [1, 1, 1, 2].")
    lora_rank: int = Field(8, ge=1, description="Rank of the LoRA trained in the adversarial stages.")
    lora_export_rank: int = Field(
        32, ge=1, description="Rank of the LoRA files written for each student (SVD of its difference from the teacher).")
    multi_timestep_max_steps: int = Field(
        2, ge=0, description="Students with at most this many steps train from several start times (paper: 1 and 2).")
    multi_timesteps: int = Field(
        4, ge=1, description="Those start times: the trailing grid of this many steps (4: 999 749 499 249).")
    renoise_fractions: list[float] = Field(
        [0.01, 0.25, 0.5, 0.75],
        description="1-step stage: both x0's are re-noised to t* = fraction x T before discrimination (paper: "
                    "{10, 250, 500, 750} of 1000). Empty = no re-noising.")
    x0_prediction: bool = Field(
        True, description="The 1-step student predicts x0 (switches an epsilon teacher's output; v/flow/EDM already "
                          "give a well-defined x0 at t = T).")
    lr_mse: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate of the full network in MSE stages.")
    lr_lora: float = Field(1e-3, gt=0, le=MAX_LR, description="AdamW learning rate of the LoRA.")
    lr_full: float = Field(
        5e-5, gt=0, le=MAX_LR, description="AdamW learning rate of the full network in adversarial stages.")
    lr_discriminator: float = Field(
        1e-4, ge=0, le=MAX_LR,
        description="AdamW learning rate of the discriminator's backbone (the teacher's encoder copy; 0 = frozen).")
    lr_head: float = Field(1e-3, gt=0, le=MAX_LR, description="AdamW learning rate of the discriminator's heads.")
    adam_betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas (all players; GAN practice).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm (None = no clipping).")
    head_width: int = Field(64, ge=8, description="Hidden width of the discriminator heads.")
    loop: LoopConfig = Field(default_factory=_default_lightning_loop, description="Training loop options.")

    @model_validator(mode="after")
    def _check(self) -> "LightningConfig":
        lad = self.ladder
        if not lad:
            raise ValueError("ladder: give at least one stage, e.g. [8, 4, 2, 1]")
        if any(b >= a for a, b in zip(lad, lad[1:])) or lad[-1] < 1:
            raise ValueError(f"ladder: {lad} must be strictly decreasing positive step counts, e.g. [8, 4, 2, 1]")
        if any(a % b for a, b in zip(lad, lad[1:])):
            raise ValueError(f"ladder: each stage's steps must divide the previous stage's ({lad}); use halvings")
        if self.teacher_steps % lad[0]:
            raise ValueError(f"teacher_steps {self.teacher_steps} is not a multiple of the first stage's "
                             f"{lad[0]} steps; set teacher_steps to a multiple of it")
        if self.steps not in lad:
            raise ValueError(f"steps {self.steps} is not on the ladder {lad}; pick one of them or add it to ladder")
        unknown = set(self.phase_weights) - set(PHASES)
        if unknown:
            raise ValueError(f"phase_weights: unknown phase(s) {sorted(unknown)}; use {', '.join(PHASES)}")
        if self.stage_weights is not None and (len(self.stage_weights) != len(lad)
                                               or any(w <= 0 for w in self.stage_weights)):
            raise ValueError(f"stage_weights: give one positive weight per ladder stage ({len(lad)}), or null")
        if any(v < 0 for v in self.phase_weights.values()):
            raise ValueError("phase_weights must not be negative")
        if any(not 0 <= f < 1 for f in self.renoise_fractions):
            raise ValueError("renoise_fractions must lie in [0, 1)")
        return self

    def stages(self) -> list[int]:
        """The ladder down to ``steps``."""
        return [k for k in self.ladder if k >= self.steps]

    def phase_kinds(self, stage: int) -> list[str]:
        if stage < self.mse_stages or self.objective == "mse_only":
            return ["mse"]
        if self.objective == "conditional":
            return ["lora_cond", "full_cond"]
        return ["lora_cond", "lora_uncond", "full_uncond"]


# ----------------------------------------------------------------------------------------------------------------
# The mathematics
# ----------------------------------------------------------------------------------------------------------------
def ddim_step(schedule: Schedule, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The deterministic DDIM step ``x_{t'} = alpha' x0 + sigma' (x_t - alpha x0) / sigma`` (``x0`` at clean)."""
    a, s = (bcast(v.to(x_t.device), x_t) for v in schedule.alpha_sigma(t))
    a_n, s_n = (bcast(v.to(x_t.device), x_t) for v in schedule.alpha_sigma(t_next))
    return a_n * x0 + s_n * (x_t - a * x0) / s


def ddim_x0_target(schedule: Schedule, x_t: Tensor, x_next: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The ``x0`` whose DDIM step from ``(x_t, t)`` lands on ``x_next`` at ``t_next`` (progressive distillation's target,
    Salimans & Ho 2022 Alg. 2): ``(x_next - (sigma'/sigma) x_t) / (alpha' - sigma' alpha / sigma)``."""
    a, s = (bcast(v.to(x_t.device), x_t) for v in schedule.alpha_sigma(t))
    a_n, s_n = (bcast(v.to(x_t.device), x_t) for v in schedule.alpha_sigma(t_next))
    return (x_next - (s_n / s) * x_t) / (a_n - s_n * a / s)


def span_grid(t: float, t_next: float, n: int) -> Tensor:
    """``n`` equal steps from ``t`` to ``t_next`` (the teacher's steps over one student step), as a sampler grid."""
    return torch.linspace(float(t), float(t_next), n + 1)


# ----------------------------------------------------------------------------------------------------------------
# LoRA (PEFT) on a denoiser's network
# ----------------------------------------------------------------------------------------------------------------
def _lora_config(targets: list[str], rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets), bias="none",
                      init_lora_weights=True)


def add_lora(net: nn.Module, rank: int) -> nn.Module:
    """Inject a zero-initialised LoRA of ``rank`` into every Linear/Conv2d of ``net`` (in place; returns it)."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(_lora_config(lora_targets(net), rank), net, adapter_name=ADAPTER)


def lora_layers(net: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def set_lora_enabled(net: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(net).values():
        layer.enable_adapters(enabled)


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if ".lora_" in n]


def base_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if ".lora_" not in n]


@torch.no_grad()
def merged_state(net: nn.Module) -> dict[str, Tensor]:
    """The plain network's state dict with the (enabled) LoRA folded in: what the adapted network computes."""
    state = {}
    for k, v in net.state_dict().items():
        if ".lora_" not in k:
            state[k.replace(".base_layer.", ".")] = v.detach().clone()
    for name, layer in lora_layers(net).items():
        if not layer.disable_adapters and ADAPTER in layer.lora_A:
            key = f"{name}.weight"
            state[key] = state[key] + layer.get_delta_weight(ADAPTER).to(state[key].dtype)
    return state


@torch.no_grad()
def fold_lora(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """Merge the LoRA into the base weights and restart it at a zero update (the network computes the same
    function before and after; its structure, hence its state-dict keys, stays the same).

    The restarted ``A`` is drawn as PEFT draws it (Kaiming-uniform, ``a = sqrt(5)``; ``B = 0``) but from
    ``generator`` when one is given: the training loop seeds the global RNG per process, and replicated players
    must restart identically on every process."""
    for layer in lora_layers(net).values():
        if ADAPTER not in layer.lora_A:
            continue
        if not layer.disable_adapters:
            w = layer.get_base_layer().weight
            w.add_(layer.get_delta_weight(ADAPTER).to(w.dtype))
        if generator is None:
            layer.reset_lora_parameters(ADAPTER, True)
            continue
        a = layer.lora_A[ADAPTER].weight
        fresh = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        a.copy_(fresh.to(a.device, a.dtype))
        nn.init.zeros_(layer.lora_B[ADAPTER].weight)


@torch.no_grad()
def extract_lora(student: nn.Module, teacher: nn.Module, rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                             dict[str, Any]]:
    """``student - teacher`` as a LoRA: every Linear/Conv2d weight difference factorised by SVD at ``rank`` (PEFT's
    layout: ``base_model.model.<layer>.lora_A.weight``, ``...lora_B.weight``, scaling 1), and every other differing
    tensor (biases, norms, embeddings) in full. Returns ``(lora, full, info)``; ``info`` has the relative error."""
    s_state, t_state = student.state_dict(), teacher.state_dict()
    modules = dict(teacher.named_modules())
    lora: dict[str, Tensor] = {}
    full: dict[str, Tensor] = {}
    err2 = tot2 = 0.0
    targets = []
    for key, w_t in t_state.items():
        diff = (s_state[key].float() - w_t.float())
        name, _, leaf = key.rpartition(".")
        mod = modules.get(name)
        if leaf == "weight" and isinstance(mod, (nn.Linear, nn.Conv2d)):
            targets.append(name)
            a, b, left = low_rank(diff, rank)
            err2 += left
            tot2 += float(diff.pow(2).sum())
            lora[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            lora[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        elif torch.is_floating_point(diff) and diff.abs().max() > 0:
            full[key] = diff.contiguous()
    info = {"rank": rank, "targets": targets,
            "relative_error": math.sqrt(err2 / tot2) if tot2 > 0 else 0.0}
    return lora, full, info


def save_lora(folder: str | Path, student_net: nn.Module, teacher_net: nn.Module, rank: int, **meta: Any) -> Path:
    """Write ``student_net - teacher_net`` as a LoRA folder (see :func:`extract_lora`); returns the folder."""
    from safetensors.torch import save

    folder = Path(folder)
    lora, full, info = extract_lora(student_net, teacher_net, rank)
    cfg = _lora_config(info["targets"], rank).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    atomic_write(folder / "adapter_model.safetensors", lambda f: f.write(save(lora)))
    atomic_write(folder / "full_tensors.safetensors", lambda f: f.write(save(full)))
    atomic_write_json(folder / "adapter_config.json", json.loads(json.dumps(cfg, default=str)))
    atomic_write_json(folder / "lora.json", {"format": "fewstep-lora", "rank": rank,
                                            "relative_error": info["relative_error"], "meta": meta})
    return folder


@torch.no_grad()
def apply_lora(teacher: Denoiser, folder: str | Path) -> Denoiser:
    """A copy of ``teacher`` with a LoRA folder from :func:`save_lora` added to its weights."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("adapter_model.safetensors", "full_tensors.safetensors"):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} not found: a LoRA folder from a lightning run holds {name}")
    lora = load_file(str(folder / "adapter_model.safetensors"))
    full = load_file(str(folder / "full_tensors.safetensors"))
    out = copy.deepcopy(teacher)
    state = out.net.state_dict()
    for key in lora:
        if key.endswith(".lora_A.weight"):
            name = key[len("base_model.model."):-len(".lora_A.weight")]
            a, b = lora[key], lora[key.replace("lora_A", "lora_B")]
            w = state[f"{name}.weight"]
            w += (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape).to(w.dtype)
    for key, d in full.items():
        state[key] += d.to(state[key].dtype)
    out.net.load_state_dict(state)
    return out.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# The student: ODE steps
# ----------------------------------------------------------------------------------------------------------------
# A Lightning student is :class:`fewstep.student.ODEStudent` (imported above as ``LightningStudent``):
# ``x0_hat = G(x_{t_i}, t_i)`` then the deterministic DDIM step to ``t_{i+1}`` (the teacher's flow), the last step to
# clean returning ``x0_hat``; one network evaluation a step. ``load_student`` (fewstep.student's, re-exported) picks it
# for a saved student whose JSON says ``meta.sampler: ode``.


# ----------------------------------------------------------------------------------------------------------------
# Players
# ----------------------------------------------------------------------------------------------------------------
class LightningDiscriminator(nn.Module):
    """``d`` = a trainable copy of the teacher (only its encoder + mid block are used, through ``features``), with a
    conditional head on ``[d(x_{t'}, t'), d(x_t, t)]`` and an unconditional head on ``d(x_{t'}, t')`` (SDXL-Lightning
    sec. 3.3-3.4). :meth:`logits` gives one logit per sample.

    ``train_backbone=False`` (``lr_discriminator: 0``): the backbone is the frozen teacher itself, not a copy (a frozen
    copy computes the same features): no gradients, no optimizer state, held in whatever dtype the loop holds the
    teacher in (bf16 under mixed precision), always in eval mode, and left out of this module's state dict (so
    checkpoints carry the heads only; the teacher is rebuilt from its own files)."""

    def __init__(self, teacher: Denoiser, width: int = 64, train_backbone: bool = True) -> None:
        super().__init__()
        self.train_backbone = train_backbone
        self.backbone = (copy.deepcopy(teacher).train().requires_grad_(True) if train_backbone
                         else teacher.eval().requires_grad_(False))
        probe = torch.zeros((1, *teacher.sample_shape))
        with torch.no_grad():
            feats = self.backbone.features(probe, torch.tensor([teacher.schedule.t_max]), None)
        channels, spatial = feats.shape[1], (feats.shape[-1] if feats.ndim == 4 else 0)
        self.cond_head = FeatureHead(2 * channels, spatial, width)
        self.uncond_head = FeatureHead(channels, spatial, width)

    def features(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.backbone.features(x, t, cond)

    def train(self, mode: bool = True) -> "LightningDiscriminator":
        super().train(mode)
        if not self.train_backbone:  # the shared teacher stays in eval mode
            self.backbone.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        if not self.train_backbone:
            prefix = kwargs.get("prefix", "") + "backbone."
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if self.train_backbone:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        extra = [k for k in state_dict if k.startswith("backbone.")]
        if strict and extra:
            raise RuntimeError(f"unexpected key(s) {extra[:3]}: this discriminator's backbone is the frozen teacher "
                               f"(lr_discriminator: 0); the state holds a trained one")
        out = {}
        for name in ("cond_head", "uncond_head"):
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            out[name] = getattr(self, name).load_state_dict(sub, strict=strict, assign=assign)
        return out

    def logits(self, x_next: Tensor, t_next: Tensor, cond: Any, conditional: bool,
               x_t_features: Tensor | None = None) -> Tensor:
        """``head_c(d(x_{t'}), d(x_t))`` when ``conditional`` (``x_t_features`` = ``d(x_t, t, c)``) else ``head_u(d(x_{t'}))``."""
        f = self.features(x_next, t_next, cond)
        if conditional:
            assert x_t_features is not None
            return self.cond_head(torch.cat([f, x_t_features], dim=1))
        return self.uncond_head(f)

    def forward(self, real: Tensor, fake: Tensor, t_real: Tensor, t_fake: Tensor, cond: Any, conditional: bool,
                x_t: Tensor | None = None, t: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The discriminator's loss ``-log p - log(1 - p_hat)`` and the real and fake logits."""
        h = self.features(x_t, t, cond) if conditional else None
        real_logits = self.logits(real, t_real, cond, conditional, h)
        fake_logits = self.logits(fake, t_fake, cond, conditional, h)
        return nonsaturating_d_loss(real_logits, fake_logits), real_logits, fake_logits


def _inner(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------
class LightningMethod(Method):
    """SDXL-Lightning as a method of the training loop (see the module docstring).

    Args:
        teacher: the frozen teacher denoiser.
        cfg: the Lightning config.
    """

    #: its phase switches load whole state dicts into the players: the loop refuses FSDP up front
    supports_fsdp = False

    def __init__(self, teacher: Denoiser, cfg: LightningConfig) -> None:
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.schedule = teacher.schedule
        self.stage_steps = cfg.stages()
        self.timesteps = student_timesteps(self.schedule, cfg.steps)
        # the phases: (stage index, kind, first iteration, end iteration)
        self.phases = self._plan(cfg.loop.iterations)

        student = copy.deepcopy(teacher).train().requires_grad_(True)
        add_lora(student.net, cfg.lora_rank)
        # lr_discriminator 0: the backbone is the frozen teacher itself (no copy, no gradients, no optimizer state)
        disc = LightningDiscriminator(teacher, cfg.head_width, train_backbone=cfg.lr_discriminator > 0)
        # restarted at every adversarial stage (host memory; a frozen backbone's state is the teacher's and not in it)
        self._disc_init = {k: v.detach().cpu().clone() for k, v in disc.state_dict().items()}
        g_mod = Generator(student)  # the student denoiser; its network carries the LoRA adapters

        def player(module: nn.Module, groups: list[dict[str, Any]]) -> Player:
            # fused: one kernel for all parameters (per tensor, the adversarial phases' largest non-network cost)
            opt = torch.optim.AdamW(groups, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay, fused=True)
            return Player(module, opt, None, cfg.grad_clip, None)

        heads = list(disc.cond_head.parameters()) + list(disc.uncond_head.parameters())
        d_groups = [{"params": heads, "lr": cfg.lr_head}]  # the heads are the last group
        if disc.train_backbone:
            d_groups.insert(0, {"params": list(disc.backbone.parameters()), "lr": cfg.lr_discriminator})
        self.players = {
            "generator": player(g_mod, [{"params": list(g_mod.parameters()), "lr": cfg.lr_mse}]),
            "discriminator": player(disc, d_groups)}
        self.phase = 0
        # steps -> {"prediction_type", and "state" (CPU tensors) or, in a run, "file" + "sha256" (<run>/stages/)}
        self.finished: dict[int, dict[str, Any]] = {}
        self._stage_teacher: Denoiser | None = None
        self._device: Any = torch.device("cpu")
        self._cache: tuple[int, Any] | None = None
        self._just_finished: tuple[int, dict[str, Tensor]] | None = None
        self._apply_mode(0)

    # --- plan ---------------------------------------------------------------------------------------------------
    def _plan(self, iterations: int) -> list[tuple[int, str, int, int]]:
        kinds = [(s, k) for s in range(len(self.stage_steps)) for k in self.cfg.phase_kinds(s)]
        if iterations < len(kinds):
            raise UserError(f"loop.iterations {iterations} is fewer than this ladder's {len(kinds)} training phases; "
                            f"pass --iterations {len(kinds)} or more")
        sw = self.cfg.stage_weights or [1.0] * len(self.cfg.ladder)
        weights = [max(self.cfg.phase_weights.get(k, 1.0) * sw[s], 1e-9) for s, k in kinds]
        total = sum(weights)
        ends, acc = [], 0.0
        for j, w in enumerate(weights):
            acc += w
            end = round(iterations * acc / total)
            lo = (ends[-1] if ends else 0) + 1
            hi = iterations - (len(kinds) - 1 - j)
            ends.append(min(max(end, lo), hi))
        starts = [0] + ends[:-1]
        return [(s, k, a, b) for (s, k), a, b in zip(kinds, starts, ends)]

    def phase_at(self, it: int) -> int:
        for j, (_, _, a, b) in enumerate(self.phases):
            if a <= it < b:
                return j
        return len(self.phases) - 1

    @property
    def stage(self) -> int:
        return self.phases[self.phase][0]

    @property
    def kind(self) -> str:
        return self.phases[self.phase][1]

    @property
    def steps_now(self) -> int:
        return self.stage_steps[self.stage]

    # --- modules ------------------------------------------------------------------------------------------------
    def _gen(self) -> Generator:
        return _unwrap(self.players["generator"].module)  # type: ignore[return-value]

    def _disc(self) -> LightningDiscriminator:
        return _unwrap(self.players["discriminator"].module)  # type: ignore[return-value]

    def _cond(self, batch: Batch) -> Any:
        """The condition of a batch (class labels, prompt embeddings or None): the one place a method reads it."""
        return batch_cond(batch, self.teacher)

    def _plain(self, state: dict[str, Tensor], prediction_type: str) -> Denoiser:
        """A frozen plain network with ``state``, on the device, in the dtype the teacher is held in (bf16 while the
        loop trains with mixed precision): a copy of the teacher, so no template copy is kept besides it."""
        den = copy.deepcopy(self.teacher)
        den.net.load_state_dict(state)
        den.prediction_type = prediction_type
        return den.to(self._device).eval().requires_grad_(False)

    def _stage_state(self, k: int) -> dict[str, Tensor]:
        """The finished ``k``-step student's network state (from memory, or its file under the run directory)."""
        f = self.finished[k]
        if "state" in f:
            return f["state"]
        if self._just_finished is not None and self._just_finished[0] == k:
            return self._just_finished[1]  # another process may not have written the file yet
        from safetensors.torch import load

        path = Path(self.run_dir or ".") / f["file"]
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: the finished {k}-step stage's weights cannot be read ({e.strerror}); this run "
                            f"cannot resume without it, start over with --restart") from None
        if hashlib.sha256(blob).hexdigest() != f["sha256"]:
            raise UserError(f"{path} is not the {k}-step stage this run finished (its contents changed); start over "
                            f"with --restart")
        return load(blob)

    def _finish_stage(self, k: int, state: dict[str, Tensor], prediction_type: str) -> None:
        """Keep a finished stage off the GPU: in a run, written once to ``<run>/stages/steps_<k>.safetensors``
        (checkpoints then carry its name and hash, not its weights); without one, as CPU tensors."""
        state = {n: v.detach().cpu().contiguous() for n, v in state.items()}
        if self.run_dir is None:
            self.finished[k] = {"state": state, "prediction_type": prediction_type}
            return
        from accelerate import PartialState
        from safetensors.torch import save

        blob = save(state)
        name = f"stages/steps_{k}.safetensors"
        if PartialState().is_main_process:  # every process holds the same state; one writes it
            atomic_write(Path(self.run_dir) / name, lambda fh: fh.write(blob))
        self.finished[k] = {"file": name, "sha256": hashlib.sha256(blob).hexdigest(),
                            "prediction_type": prediction_type}
        self._just_finished = (k, state)  # until the next stage's teacher is built from it

    def _prediction_type(self, stage: int) -> str:
        if (self.cfg.x0_prediction and self.stage_steps[stage] == 1
                and self.teacher.prediction_type == "epsilon"):
            return "sample"
        return self.teacher.prediction_type

    # --- phases -------------------------------------------------------------------------------------------------
    def _apply_mode(self, j: int) -> None:
        """Set what phase ``j`` trains (flags, prediction type, the stage's teacher); no weights change here."""
        stage, kind, _, _ = self.phases[j]
        net = self._gen().denoiser.net
        lora = kind.startswith("lora")
        set_lora_enabled(net, lora)
        for p in base_parameters(net):
            p.requires_grad_(not lora)
        for p in lora_parameters(net):
            p.requires_grad_(lora)
        self._gen().denoiser.prediction_type = self._prediction_type(stage)
        if stage == 0:
            self._stage_teacher = None
        else:
            k_prev = self.stage_steps[stage - 1]
            self._stage_teacher = None  # the previous one's memory first
            self._stage_teacher = self._plain(self._stage_state(k_prev), self.finished[k_prev]["prediction_type"])
        self._just_finished = None

    def _switch(self, j: int) -> None:
        """Leave the current phase for phase ``j`` (the next one)."""
        old_stage, old_kind = self.phases[self.phase][:2]
        stage, kind = self.phases[j][:2]
        net = self._gen().denoiser.net
        # the restarted LoRA is drawn from (seed, phase) alone, the same on every process
        rng = torch.Generator().manual_seed(self.cfg.loop.seed * 1_000_003 + j)
        if old_kind.startswith("lora") and not kind.startswith("lora"):
            fold_lora(net, rng)  # merge the LoRA, then the full network trains
        if stage != old_stage:
            fold_lora(net, rng)
            self._finish_stage(self.stage_steps[old_stage], merged_state(net), self._gen().denoiser.prediction_type)
            if kind != "mse":  # a fresh discriminator for every adversarial stage
                self._disc().load_state_dict(self._disc_init)
                _inner(self.players["discriminator"].optimizer).state.clear()
        g_opt = _inner(self.players["generator"].optimizer)
        g_opt.state.clear()
        lr = self.cfg.lr_mse if kind == "mse" else self.cfg.lr_lora if kind.startswith("lora") else self.cfg.lr_full
        for group in g_opt.param_groups:
            group["lr"] = lr
        d_groups = _inner(self.players["discriminator"].optimizer).param_groups
        d_groups[-1]["lr"] = self.cfg.lr_head
        if len(d_groups) > 1:
            d_groups[0]["lr"] = self.cfg.lr_discriminator
        self.phase = j
        self._apply_mode(j)

    def updates(self, it: int) -> list[str]:
        target = self.phase_at(it)
        while self.phase < target:
            self._switch(self.phase + 1)
        return ["generator"] if self.kind == "mse" else ["discriminator", "generator"]

    # --- training pairs -----------------------------------------------------------------------------------------
    def _start_times(self, k: int) -> Tensor:
        ts = student_timesteps(self.schedule, k)
        if k <= self.cfg.multi_timestep_max_steps:
            extra = student_timesteps(self.schedule, self.cfg.multi_timesteps)
            ts = torch.unique(torch.cat([ts, extra])).flip(0)
        return ts

    def _next_time(self, t: float, k: int) -> float:
        grid = student_timesteps(self.schedule, k)
        if k == 1:
            return self.schedule.t_clean
        t_next = t - float(grid[0] - grid[1])
        return t_next if t_next >= self.schedule.t_min else self.schedule.t_clean

    @torch.no_grad()
    def _teacher_step(self, x_t: Tensor, t: float, t_next: float, cond: Any) -> Tensor:
        """The stage teacher's ``x_{t'}`` from ``x_t``: n of its steps over the span."""
        k = self.steps_now
        if self._stage_teacher is None:
            n = self.cfg.teacher_steps // k
            real = guided(self.teacher, self.cfg.guidance_scale) if cond is not None else self.teacher
            fn = sample_heun if self.cfg.teacher_sampler == "heun" else sample_ddim
            return fn(real, x_t, span_grid(t, t_next, n).to(x_t.device), cond)
        n = self.stage_steps[self.stage - 1] // k
        return sample_ddim(self._stage_teacher, x_t, span_grid(t, t_next, n).to(x_t.device), cond)

    def _pairs(self, batch: Batch, it: int) -> dict[str, Any]:
        """This iteration's ``x_t`` (noised data at one start time) and the stage teacher's ``x_{t'}`` (cached: the
        discriminator's and the generator's updates of an iteration see the same pair)."""
        if self._cache is not None and self._cache[0] == it:
            return self._cache[1]
        k = self.steps_now
        starts = self._start_times(k)
        t = float(starts[int(torch.randint(0, len(starts), ()).item())])
        t_next = self._next_time(t, k)
        x0, n, device = batch.x0, batch.x0.shape[0], batch.x0.device
        tt = torch.full((n,), t, device=device)
        tn = torch.full((n,), t_next, device=device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), tt)
        cond = self._cond(batch)
        x_next = self._teacher_step(x_t, t, t_next, cond)
        pairs = {"t": tt, "t_next": tn, "x_t": x_t, "x_next": x_next, "cond": cond}
        self._cache = (it, pairs)
        return pairs

    def _student_step(self, pairs: dict[str, Any]) -> Tensor:
        x0_hat = self.players["generator"].module(pairs["x_t"], pairs["t"], pairs["cond"])
        if pairs["t_next"][0].item() == self.schedule.t_clean:
            return x0_hat
        return ddim_step(self.schedule, pairs["x_t"], x0_hat, pairs["t"], pairs["t_next"])

    def _disc_inputs(self, x: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """What the discriminator sees of an ``x_{t'}``: as is, except clean samples, which the 1-step stage re-noises
        to a random ``t*`` and other stages show at ``t_min``."""
        if t_next[0].item() != self.schedule.t_clean:
            return x, t_next
        n = x.shape[0]
        fr = self.cfg.renoise_fractions
        if self.steps_now == 1 and fr:
            idx = torch.randint(0, len(fr), (n,), device=x.device)
            t_star = self.schedule.from_fraction(torch.tensor(fr, device=x.device)[idx]).to(x.device)
            if self.schedule.kind == "ddpm":
                t_star = t_star.round()
            return self.schedule.add_noise(x, torch.randn_like(x), t_star), t_star
        return x, torch.full((n,), self.schedule.t_min, device=x.device)

    # --- losses -------------------------------------------------------------------------------------------------
    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, Any]]:
        pairs = self._pairs(batch, it)
        conditional = self.kind.endswith("cond") and not self.kind.endswith("uncond")
        stats: dict[str, Any] = {"stage_steps": float(self.steps_now), "phase": float(self.phase)}
        if player == "discriminator":
            with torch.no_grad():
                fake = self._student_step(pairs)
            real_in, t_real = self._disc_inputs(pairs["x_next"], pairs["t_next"])
            fake_in, t_fake = self._disc_inputs(fake, pairs["t_next"])
            loss, real_l, fake_l = self.players["discriminator"].module(
                real_in, fake_in, t_real, t_fake, pairs["cond"], conditional, pairs["x_t"], pairs["t"])
            stats.update(d=loss.detach(), real_logit=real_l.detach().mean(), fake_logit=fake_l.detach().mean())
            return loss, stats
        x_hat = self._student_step(pairs)
        with torch.no_grad():
            mse = F.mse_loss(x_hat, pairs["x_next"])
        stats["mse_to_teacher"] = mse
        if self.kind == "mse":
            target = ddim_x0_target(self.schedule, pairs["x_t"], pairs["x_next"], pairs["t"], pairs["t_next"])
            x0_hat = self._x0_of(x_hat, pairs)
            loss = F.mse_loss(x0_hat, target)
            stats["mse_x0"] = loss.detach()
            return loss, stats
        disc = self._disc()  # not updated here: bypass DDP
        fake_in, t_fake = self._disc_inputs(x_hat, pairs["t_next"])
        h = None
        if conditional:
            with torch.no_grad():
                h = disc.features(pairs["x_t"], pairs["t"], pairs["cond"])
        logits = disc.logits(fake_in, t_fake, pairs["cond"], conditional, h)
        loss = nonsaturating_g_loss(logits)
        stats.update(g=loss.detach(), fake_logit_g=logits.detach().mean())
        return loss, stats

    def _x0_of(self, x_next_hat: Tensor, pairs: dict[str, Any]) -> Tensor:
        if pairs["t_next"][0].item() == self.schedule.t_clean:
            return x_next_hat
        return ddim_x0_target(self.schedule, pairs["x_t"], x_next_hat, pairs["t"], pairs["t_next"])

    # --- outputs ------------------------------------------------------------------------------------------------
    def to(self, device: Any) -> "LightningMethod":
        self._device = torch.device(device) if not isinstance(device, torch.device) else device
        self.teacher.to(device)
        if self._stage_teacher is not None:
            self._stage_teacher.to(device)
        return self

    def inference_model(self) -> Denoiser:
        """The current student as a plain network (LoRA merged)."""
        den = self._gen().denoiser
        return self._plain(merged_state(den.net), den.prediction_type)

    def student(self) -> LightningStudent:
        """The current stage's student (its own step count), sampling with ODE steps."""
        return LightningStudent(self.inference_model(), student_timesteps(self.schedule, self.steps_now))

    #: recorded in the saved student's JSON: it samples with ODE steps
    student_meta = {"sampler": "ode"}

    def students(self) -> dict[int, LightningStudent]:
        """Every stage's student so far, by steps (the current stage's as it is now)."""
        out = {}
        for k, f in self.finished.items():
            out[k] = LightningStudent(self._plain(self._stage_state(k), f["prediction_type"]),
                                      student_timesteps(self.schedule, k))
        out[self.steps_now] = self.student()
        return dict(sorted(out.items(), reverse=True))

    def save_outputs(self, run_dir: str | Path, **meta: Any) -> dict[int, dict[str, str]]:
        """Write every stage's student to ``run_dir/students/``: full weights and a LoRA folder (module docstring)."""
        from ..models import save_denoiser

        folder = Path(run_dir) / "students"
        written = {}
        for k, st in self.students().items():
            gen = st.generator.cpu()
            prefix = folder / f"steps_{k}"
            save_denoiser(gen, prefix, kind="student", timesteps=st.timesteps.tolist(), steps=k, sampler="ode",
                          **{key: v for key, v in meta.items() if key not in ("steps", "sampler", "kind", "timesteps")})
            lora_dir = save_lora(folder / f"lora_steps_{k}", gen.net, self.teacher.net.cpu(), self.cfg.lora_export_rank,
                                 steps=k, timesteps=st.timesteps.tolist(), teacher=self.cfg.teacher)
            written[k] = {"full": str(prefix.with_suffix(".safetensors")), "lora": str(lora_dir)}
        self.teacher.to(self._device)
        return written

    def extra_state(self) -> dict[str, Any]:
        """The phase and the finished stages: in a run their file names and hashes (the weights are written once
        under ``<run>/stages/``), so a checkpoint holds only the players' state besides."""
        return {"phase": self.phase, "phases": [list(p) for p in self.phases],
                "finished": {str(k): dict(f) for k, f in self.finished.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = [tuple(p) for p in state.get("phases", [])]
        if saved and saved != [tuple(p) for p in self.phases]:
            raise UserError("the checkpoint was trained with another phase plan (ladder, objective, phase_weights or "
                            "iterations); resume with the config it was made with")
        self.phase = int(state["phase"])
        self.finished = {int(k): dict(f) for k, f in state.get("finished", {}).items()}
        self._cache = None
        self._apply_mode(self.phase)


__all__ = [
    "LightningConfig",
    "LightningMethod",
    "LightningStudent",
    "LightningDiscriminator",
    "ddim_step",
    "ddim_x0_target",
    "add_lora",
    "fold_lora",
    "merged_state",
    "extract_lora",
    "save_lora",
    "apply_lora",
    "load_student",
]
