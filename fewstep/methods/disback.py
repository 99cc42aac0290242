"""DisBack: distribution backtracking (Zhang et al. 2024; METHODS.md, "DisBack"), a wrapper of score distillation.

Score distillation starts with a large mismatch between the teacher's score and the untrained generator's
distribution. DisBack gives the generator a path to follow instead of the endpoint alone:

1. **Degradation recording** (:func:`record_degradation_path`): a copy of the teacher, ``D_deg``, is fine-tuned with
   the ordinary denoising loss on samples of the *initial* (frozen, untrained) generator, and ``N`` checkpoints are
   saved along the way. ``D^(0)`` is the teacher, ``D^(N)`` fits the initial generator's distribution. The path is
   cached on disk (safetensors, atomic writes) under a key hashing the teacher's weights, the initial generator's
   weights and every recording setting, so later runs from the same teacher and generator reuse it.
2. **Distribution backtracking** (:class:`DisBackMethod`): the wrapped method (DMD2, or ADD's score-distillation term)
   runs unchanged, except that its *real score* is a frozen copy of the teacher into which the path's checkpoints are
   loaded in reverse order ``D^(N-1), D^(N-2), ..., D^(0) = teacher`` (:class:`Backtrack`), moving on every
   ``switch_every`` generator updates (``switch_unit: generator_updates``, the default; or loop iterations) or when
   the score mismatch on the current target falls below ``switch_threshold``.
   The fake score (where the method has one) starts from ``D^(N)``, which already fits the initial generator; DMD2's
   per-step fake score (``fake_score: per_step``) at every step: ``D^(N)`` goes into its trunk (in place, the
   optimizer's weights) and each step's adapter is reset to zero.

Choices where the paper and METHODS.md are silent, following the public DisBack code (SDXL on DMD2) where it is sound:

* Recording trains ``D_deg`` (METHODS.md stage 1), and with ``head_along_path`` a copy of DMD2's GAN head beside it
  (below). Optimiser: AdamW ``betas (0.9, 0.999)``, gradient clipping at 10 (the
  reference's), weight decay ``record_weight_decay``, warm-up ``record_warmup``, learning rate ``record_lr`` (the
  reference's degradation script: 5e-7, batch 1, weight decay 0.01, 500 warm-up steps; default: the wrapped method's
  fake-score rate, refused when that is a LoRA rate). Precision and gradient checkpointing follow the loop's
  (``record_mixed_precision``, ``record_gradient_checkpointing``): the copy trains in float32 under bf16 autocast and
  the frozen generator is held in bf16, and the recording runs before anything else is moved to the GPU. Times are
  drawn as in teacher training. Conditions: uniform class labels, or a text-to-image teacher's prompts drawn
  uniformly from its prompt bank (the data's captions; the generator samples with them), dropped to the null
  condition with ``record_label_dropout`` so that CFG's unconditional branch degrades too.
* The reference code loads each checkpoint with ``strict=False`` under mismatched key prefixes (so nothing loads)
  and its switch condition allows one switch only. Here every switch is a ``strict=True`` ``load_state_dict`` of the
  checkpoint's own network state into the one frozen target copy, and every stage is reached (tests check both).
* The wrapped method's teacher object itself is never modified (the run's report and ADD's teacher features use it);
  the weights are swapped in a private copy installed as the method's real score.
* Switches count the generator's updates by default: with DMD2's TTUR the generator updates every ``ttur``-th
  iteration, so ``switch_every: N`` generator updates is a switch every ``ttur * N`` iterations (the reference's
  ``--interval 1000`` counts loop iterations: ``switch_unit: iterations``, 200 generator updates at TTUR 5). The count
  is the method's own (updates scheduled so far, in ``extra_state``), not derived from the iteration. The generator's
  learning-rate warm-up is DMD2's ``warmup_iterations`` (in ``warmup_unit``); the method warns when it lasts past the
  first switch (then the early targets are followed at a reduced rate).
* ``init_generator``: the generator starts from a trained student's weights (a ``fewstep distill`` run directory or
  its ``student.safetensors``) instead of the teacher's, as the reference's SDXL scripts start DisBack from a DMD2
  generator; the path is then recorded towards that student (the path key hashes its weights).
* The GAN head (``head_along_path``, :class:`HeadRecording`). The reference's recording trains its whole guidance
  model, fake score and GAN head (``cls_pred_branch``), with DMD2's losses and saves all of it at every checkpoint;
  at a switch it loads the checkpoint into its real score only (``real_unet.load_state_dict(..., strict=False)``,
  under key prefixes that match nothing), so its head is recorded but never restored. Ours, on request: the
  recording trains a copy of the head with ``D_deg`` (DMD2's guidance loss, the head on ``D_deg``'s features, real
  data against initial-generator samples), saves ``head^(k)`` beside ``D^(k)`` (``head^(0)``: as built); the run
  starts the head from ``head^(N)`` with the fake score at ``D^(N)``, and each switch to ``D^(k)`` loads
  ``head^(k)`` in place (the optimizer's moments carry on; a resume keeps the trained head of its checkpoint).
  Default off: the head trains from scratch (README, "DisBack", gives the grid25 check).
* The switch schedule is part of the method's checkpointed state (``extra_state``), so a resumed run continues on the
  same target; the threshold test averages the last ``switch_window`` generator updates' mismatch, across processes.
* Every generator update logs ``score_mismatch`` (measured against the *current* target) and ``stage``.

Wrapping another method needs a :class:`BaseSpec`: the name of its real-score attribute (plus, optionally, what to
re-derive from it), its fake score if it has one, its generator player and the stat that measures the mismatch.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator
from torch import Tensor, nn

from ..config import STRICT, TEACHER_DESCRIPTION, DMD2Config, LoopConfig, _default_distill_loop
from ..diffusion.denoiser import Denoiser, guided
from ..diffusion.samplers import sample_student
from ..errors import UserError
from ..io import atomic_write, atomic_write_json
from ..models.checkpointing import enable_gradient_checkpointing
from ..options import MAX_LR
from ..models.discriminators import nonsaturating_d_loss
from .base import Batch, Method
from .dmd2 import _unwrap

try:  # ADD lives in its own module; DisBack + DMD2 must not depend on it being importable
    from .add import ADDConfig as _ADDConfig
except Exception:  # pragma: no cover - only while add.py is missing or broken
    _ADDConfig = None

PATH_FORMAT = "fewstep-degradation-path"
PATH_VERSION = 2  # 2: text-to-image recordings use the data's prompts; warm-up, weight decay and precision
#: keys every distillation config has; under DisBack they are set once, at the top level, for the wrapped method too
SHARED_FIELDS = ("method", "teacher", "data", "steps", "loop")


if _ADDConfig is None:  # pragma: no cover
    class _ADDConfig(BaseModel):  # type: ignore[no-redef]
        """Placeholder while ADD is not importable; ``base: add`` is refused when the method is built."""

        model_config = ConfigDict(extra="allow")

    _ADD_AVAILABLE = False
else:
    _ADD_AVAILABLE = True


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
class DisBackConfig(BaseModel):
    """DisBack (Zhang et al. 2024) around a score-distillation method: record the teacher's degradation towards the
    initial generator, then distil against that path's checkpoints in reverse order, ending on the teacher.

    The wrapped method's own options live under its name (``dmd2:`` or ``add:``); ``teacher``, ``data``, ``steps``
    and ``loop`` are set here, at the top level, and apply to it too. ``loop.iterations`` counts the backtracking
    (distillation) iterations only; the recording adds ``record_checkpoints * record_every`` iterations before them
    (0 when the path is found in the cache)."""

    model_config = STRICT

    method: Literal["disback"] = Field("disback", description="The distillation method.")
    base: Literal["dmd2", "add"] = Field(
        "dmd2", description="The score-distillation method DisBack wraps: 'dmd2' (its real score in the DM loss) or "
                            "'add' (the teacher of ADD's score-distillation term).")
    teacher: str = Field("digits", description=TEACHER_DESCRIPTION)
    data: str | None = Field(None, description="Real data (default: the teacher's training data).")
    steps: int = Field(1, ge=1, le=8, description="Student sampling steps (trailing spacing, e.g. 999 749 499 249).")
    dmd2: DMD2Config | None = Field(
        None,
        description="Options of the wrapped DMD2 (base: dmd2; omitted = DMD2's defaults). Its teacher, data, steps "
                    "and loop are the top-level ones.")
    add: _ADDConfig | None = Field(  # type: ignore[valid-type]
        None,
        description="Options of the wrapped ADD (base: add; omitted = ADD's defaults). Its teacher, data, steps and "
                    "loop are the top-level ones.")
    record_checkpoints: int = Field(
        4, ge=1,
        description="N: checkpoints D^(1..N) saved along the degradation path (D^(0) is the teacher). Reference code: "
                    "10. Ours: 4, for runs of 1-2k iterations.")
    record_every: int = Field(
        30, ge=1,
        description="Recording iterations between two checkpoints (the recording takes N * record_every iterations). "
                    "Reference code: 100 (1,000 recording iterations). Ours: 30 (120, under 10% of a run's budget).")
    record_lr: float | None = Field(
        None, gt=0, le=MAX_LR,
        description="AdamW learning rate of the degrading teacher copy, a full network (reference code: 5e-7, "
                    "--guidance_lr of its degradation script). None: the wrapped method's fake-score rate "
                    "(dmd2.lr_fake; for ADD, add.lr_generator), refused when that is a LoRA rate.")
    record_batch_size: int | None = Field(
        None, ge=1, description="Batch of initial-generator samples per recording iteration (reference code: 1 on one "
                                "GPU). None: loop.batch_size.")
    record_weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay of the recording (reference code: 0.01, PyTorch's default).")
    record_warmup: int = Field(
        0, ge=0, description="Linear learning-rate warm-up of the recording, in iterations (reference code: 500, "
                             "DMD2's constant_with_warmup).")
    record_mixed_precision: Literal["no", "bf16"] | None = Field(
        None,
        description="Precision of the recording: 'bf16' trains the fp32 copy under bf16 autocast with the initial "
                    "generator held in bf16 (reference code: --use_fp16, bf16 autocast); 'no' = float32. None: "
                    "loop.mixed_precision (fp16 records in float32: no loss scaler there).")
    record_gradient_checkpointing: bool | None = Field(
        None, description="Recompute the copy's activations in backward during the recording (None: "
                          "loop.gradient_checkpointing).")
    record_label_dropout: float = Field(
        0.1, ge=0, le=1,
        description="Probability of training the copy on the null condition (null class, or the empty prompt of a "
                    "text-to-image teacher, whose recording uses the data's prompts), so that CFG's unconditional "
                    "branch degrades too, as in teacher training. The reference code trains on prompts only (its "
                    "real score's unconditional branch drifts only through shared weights).")
    record_seed: int = Field(
        0, ge=0,
        description="Seed of the recording's draws (apart from loop.seed, so runs with other seeds share the path).")
    switch_every: int | None = Field(
        12, ge=1,
        description="Move to the next target (one checkpoint back towards the teacher) every this many switch_units "
                    "(None: only by threshold). Reference code: 1,000 iterations (200 generator updates at TTUR 5). "
                    "Ours: 12 generator updates (60 iterations at TTUR 5), so a 4-checkpoint path reaches the teacher "
                    "after 36 generator updates: at our scale DMD2 itself moves within a few hundred iterations, and "
                    "longer stages only delayed it in early trials (benchmarks/convergence.py; issue 17 measures "
                    "longer ones).")
    switch_unit: Literal["generator_updates", "iterations"] = Field(
        "generator_updates",
        description="What switch_every counts: 'generator_updates' (the wrapped method's generator updates, counted "
                    "by the method and checkpointed: with DMD2's ttur a switch every N updates is one every ttur x N "
                    "iterations) or loop 'iterations' (the reference code's --interval).")
    init_generator: str | None = Field(
        None,
        description="Start the generator from a trained student instead of the teacher: a `fewstep distill` run "
                    "directory (its student.safetensors) or a .safetensors file of the generator's network (the "
                    "teacher's architecture). The path is recorded towards it. The reference's SDXL scripts start "
                    "DisBack from a trained DMD2 generator; the paper from the untrained one (None).")
    head_along_path: bool = Field(
        False,
        description="Record DMD2's GAN head along the path and restore it at each switch: the recording trains a copy "
                    "of the head with D_deg (DMD2's guidance loss: denoising plus gan_head_weight x the head's loss on "
                    "diffused real data against diffused initial-generator samples, the head reading D_deg's "
                    "features), saving head^(k) beside D^(k); the run starts the head from head^(N) with the fake "
                    "score from D^(N), and each switch to target D^(k) loads head^(k) (head^(0): the head as built). "
                    "The reference code records the head this way (its checkpoints hold the whole guidance model) "
                    "but at a switch loads only into its real score (and there nothing, under mismatched key "
                    "prefixes). false: the head trains from scratch, the path holds D_deg alone. base dmd2 with gan "
                    "only; class-conditional or unconditional teachers; not under loop.fsdp.")
    switch_threshold: float | None = Field(
        None, gt=0,
        description="Also move on once the score mismatch on the current target (the generator's logged "
                    "score_mismatch: mean over samples of ||D_target - D_fake||^2 on diffused generator samples; "
                    "ADD: its distill_mse) averaged over the last switch_window generator updates falls below this "
                    "(None: only by count).")
    switch_window: int = Field(
        5, ge=1, description="Generator updates the threshold test averages the mismatch over (reset at each switch).")
    path_dir: str | None = Field(
        None,
        description="Folder of the degradation-path cache, shared between runs (--path-cache); the path is stored in "
                    "<path_dir>/<key>/. None: <run directory>/degradation_path/<key>/.")
    loop: LoopConfig = Field(default_factory=_default_distill_loop, description="Training loop options.")

    @model_validator(mode="before")
    @classmethod
    def _shared_fields_at_top_level(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("dmd2", "add"):
                sub = data.get(name)
                if isinstance(sub, dict):
                    for key in SHARED_FIELDS:
                        if key in sub:
                            raise ValueError(f"{name}.{key}: set `{key}` at the top level of a disback config; it "
                                             f"applies to the wrapped method too")
        return data

    @model_validator(mode="after")
    def _check(self) -> "DisBackConfig":
        base = getattr(self, self.base)
        if self.record_lr is None and base is not None and getattr(base, "lora_rank", None):
            raise ValueError(f"record_lr: set it explicitly (reference code: 5e-7); the default, {self.base}'s own "
                             f"rate, is a LoRA rate here (lora_rank {base.lora_rank}) and the recording trains a full "
                             f"copy of the teacher")
        if self.switch_every is None and self.switch_threshold is None:
            raise ValueError("set switch_every or switch_threshold (or both): otherwise the target never moves")
        if self.head_along_path:
            gan = self.base == "dmd2" and (self.dmd2 is None or self.dmd2.gan)
            if not gan:
                raise ValueError("head_along_path records DMD2's GAN head: it needs base: dmd2 with dmd2.gan: true; "
                                 "set head_along_path: false")
            if self.loop.fsdp:
                raise ValueError("head_along_path restores the GAN head in place, which a sharded guidance player "
                                 "does not allow; set head_along_path: false or loop.fsdp: false")
        other = "add" if self.base == "dmd2" else "dmd2"
        if getattr(self, other) is not None:
            raise ValueError(f"{other}: options of base {other!r} given, but base is {self.base!r}")
        current = getattr(self, self.base)
        if current is None:
            current = DMD2Config() if self.base == "dmd2" else _ADDConfig()
        setattr(self, self.base, current.model_copy(update=self.shared()))
        return self

    @field_serializer("dmd2", "add")
    def _without_shared(self, value: BaseModel | None, info: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        return {k: v for k, v in value.model_dump(mode=info.mode).items() if k not in SHARED_FIELDS}

    def shared(self) -> dict[str, Any]:
        """The fields the wrapped method's config takes from this one."""
        return {"teacher": self.teacher, "data": self.data, "steps": self.steps, "loop": self.loop}

    def base_config(self) -> BaseModel:
        """The wrapped method's resolved config (its shared fields set from this one)."""
        return getattr(self, self.base).model_copy(update=self.shared())

    def recording_iterations(self) -> int:
        return self.record_checkpoints * self.record_every


# ----------------------------------------------------------------------------------------------------------------
# The methods DisBack can wrap
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseSpec:
    """How DisBack reaches into a score-distillation method.

    Args:
        name: the method's name (and the DisBack config field holding its options).
        method_cls: returns the method class (imported lazily).
        real_attr: the attribute holding the frozen denoiser the method's loss calls as the real score; DisBack sets
            it to its own frozen copy of the teacher, into which it loads the path's checkpoints.
        rederive: re-derive whatever the method built from ``real_attr`` (DMD2: ``real = guided(teacher, w)``).
        fake: the method's fake-score denoiser, started from ``D^(N)`` (None: the method has none, as ADD).
        generator_player: the player whose loss holds the score term.
        mismatch_stat: the generator stat measuring the mismatch between the real score and the fake one.
        record_lr: the default recording learning rate from the method's config.
        head: the method's GAN head on its fake score (``head_along_path``), or None.
    """

    name: str
    method_cls: Callable[[], type]
    real_attr: str
    rederive: Callable[[Method], None] | None
    fake: Callable[[Method], Denoiser | None]
    mismatch_stat: str
    record_lr: Callable[[Any], float]
    generator_player: str = "generator"
    head: Callable[[Method], nn.Module | None] = lambda m: None


def _dmd2_cls() -> type:
    from .dmd2 import DMD2Method

    return DMD2Method


def _add_cls() -> type:
    if not _ADD_AVAILABLE:
        raise UserError("base: add needs the ADD method (fewstep/methods/add.py), which is not available")
    from .add import ADDMethod

    return ADDMethod


def _dmd2_rederive(m: Any) -> None:
    m.real = guided(m.teacher, m.cfg.guidance_scale)


BASES: dict[str, BaseSpec] = {
    "dmd2": BaseSpec(
        name="dmd2", method_cls=_dmd2_cls, real_attr="teacher", rederive=_dmd2_rederive,
        fake=lambda m: _unwrap(m.players["guidance"].module).fake, mismatch_stat="score_mismatch",
        record_lr=lambda cfg: cfg.lr_fake, head=lambda m: _unwrap(m.players["guidance"].module).head),
    # ADD's score-distillation term calls score_distillation_loss(self.teacher, ...) at every step; it has no fake
    # score, so its mismatch is the target's residual on the student's samples, distill_mse.
    "add": BaseSpec(
        name="add", method_cls=_add_cls, real_attr="teacher", rederive=None, fake=lambda m: None,
        mismatch_stat="distill_mse", record_lr=lambda cfg: cfg.lr_generator),
}


# ----------------------------------------------------------------------------------------------------------------
# The degradation path
# ----------------------------------------------------------------------------------------------------------------
def state_hash(state: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict: every key, dtype, shape and byte, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RecordSettings:
    """Everything besides the two networks that decides a recording (all of it goes into the cache key)."""

    checkpoints: int
    every: int
    lr: float
    batch_size: int
    label_dropout: float = 0.1
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 10.0
    warmup: int = 0
    mixed_precision: str = "no"  # "bf16": fp32 copy under bf16 autocast, the frozen generator in bf16
    #: activation recomputation: memory only (not in the cache key; the path is the same function of the settings)
    gradient_checkpointing: bool = False

    @property
    def iterations(self) -> int:
        return self.checkpoints * self.every

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoints": self.checkpoints, "every": self.every, "lr": self.lr, "batch_size": self.batch_size,
                "label_dropout": self.label_dropout, "seed": self.seed, "betas": list(self.betas),
                "weight_decay": self.weight_decay, "grad_clip": self.grad_clip, "warmup": self.warmup,
                "mixed_precision": self.mixed_precision}


@dataclass(frozen=True)
class HeadRecording:
    """What the recording needs to train the GAN head with ``D_deg`` (``head_along_path``).

    Args:
        head: the wrapped method's head as built (copied, not modified; its state is ``head^(0)``).
        x: real training data ``(N, ...)``, in the teacher's sample space.
        labels: their classes ``(N,)`` (class-conditional teachers), or None.
        weight: the head loss's weight in the recording's loss (DMD2's ``gan_head_weight``).
    """

    head: nn.Module
    x: Tensor
    labels: Tensor | None
    weight: float

    def key(self) -> dict[str, Any]:
        data = {"x": self.x} if self.labels is None else {"x": self.x, "labels": self.labels}
        return {"head": state_hash(self.head.state_dict()), "data": state_hash(data), "weight": self.weight}


def path_key(teacher: Denoiser, generator: Denoiser, timesteps: Tensor, settings: RecordSettings,
             head: HeadRecording | None = None) -> str:
    """The cache key of a degradation path: a hash of the teacher's weights, the initial generator's weights, its
    sampling times, the schedule and parameterisation, and every recording setting (and, with the GAN head, its
    initial weights, the real data and the head loss's weight)."""
    material = {
        "format": PATH_FORMAT, "version": PATH_VERSION,
        "teacher": state_hash(teacher.net.state_dict()),
        "generator": state_hash(generator.net.state_dict()),
        "timesteps": [float(t) for t in timesteps.tolist()],
        "schedule": teacher.schedule.to_config(),
        "prediction_type": teacher.prediction_type,
        "sample_shape": list(teacher.sample_shape),
        "num_classes": teacher.num_classes,
        "prompts": _prompt_hash(teacher),
        "settings": settings.as_dict(),
    }
    if head is not None:  # only then: the keys of paths without a head stay as they were
        material["gan_head"] = head.key()
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class DegradationPath:
    """The recorded path ``D^(0) = teacher, D^(1), ..., D^(N)`` in ``dir`` (checkpoint files ``step_XXX``)."""

    dir: Path
    key: str
    checkpoints: int
    teacher: Denoiser = field(repr=False)
    recorded: bool = False  # True when this call trained it, False when it came from the cache
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    def file(self, k: int) -> Path:
        """The safetensors file of ``D^(k)``, ``k >= 1`` (``D^(0)`` is the teacher itself)."""
        assert 1 <= k <= self.checkpoints, k
        return self.dir / f"step_{k:03d}.safetensors"

    def state(self, k: int) -> dict[str, Tensor]:
        """The network state of ``D^(k)`` (keys of ``denoiser.net.state_dict()``)."""
        assert 0 <= k <= self.checkpoints, k
        if k == 0:
            return {name: t.detach() for name, t in self.teacher.net.state_dict().items()}
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.file(k)))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{self.file(k)} is not a readable safetensors file ({e}); the degradation path in "
                            f"{self.dir} is damaged: remove that folder and it is recorded again") from None

    def head_file(self, k: int) -> Path:
        """The safetensors file of ``head^(k)``, ``0 <= k <= N`` (recorded with ``head_along_path``)."""
        assert 0 <= k <= self.checkpoints, k
        return self.dir / f"head_{k:03d}.safetensors"

    def head_state(self, k: int) -> dict[str, Tensor]:
        """The GAN head's state recorded at ``D^(k)`` (``k = 0``: the head as built, before the recording)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.head_file(k)))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{self.head_file(k)} is not a readable safetensors file ({e}); the degradation path in "
                            f"{self.dir} is damaged: remove that folder and it is recorded again") from None

    def load_into(self, denoiser: Denoiser, k: int) -> None:
        """Load ``D^(k)`` into ``denoiser`` (strict: every key, no prefix games)."""
        from ..models.lora import load_network_state  # a LoRA fake score: into its base weights, adapters reset

        with torch.no_grad():
            load_network_state(denoiser.net, self.state(k))


def _save_checkpoint(denoiser: Denoiser, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.net.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(state)))
    try:  # a description beside it makes every checkpoint a loadable teacher (fewstep eval --model step_003.json)
        from ..models import describe

        atomic_write_json(path.with_suffix(".json"), describe(denoiser, kind="degradation_checkpoint", **meta))
    except TypeError:  # a network outside our embedded ones: the weights alone
        pass


def _save_head(head: nn.Module, path: Path) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(state)))


def open_degradation_path(root: str | Path, key: str, teacher: Denoiser) -> DegradationPath | None:
    """The complete path cached under ``root/key``, or None (a missing manifest means an unfinished recording)."""
    folder = Path(root) / key
    manifest = folder / "path.json"
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("format") != PATH_FORMAT or info.get("key") != key:
        return None
    path = DegradationPath(folder, key, int(info["checkpoints"]), teacher, recorded=False, info=info)
    if not all(path.file(k).is_file() for k in range(1, path.checkpoints + 1)):
        return None
    if info.get("gan_head") and not all(path.head_file(k).is_file() for k in range(path.checkpoints + 1)):
        return None
    return path


def _prompt_hash(teacher: Denoiser) -> str | None:
    """SHA-256 of a text-to-image teacher's prompt bank (the recording's conditions), None for other teachers."""
    if not getattr(teacher, "text_conditional", False):
        return None
    bank = getattr(getattr(teacher, "components", None), "prompts", None)
    return None if bank is None else state_hash(bank.table)


def _draw_condition(teacher: Denoiser, n: int, rng: torch.Generator, device: Any) -> Any:
    """One recording batch's conditions, on ``device``: uniform class labels; for a text-to-image teacher the
    embeddings of uniformly drawn captions of its prompt bank (the data's prompts); None when unconditional."""
    if teacher.num_classes > 0:
        return torch.randint(0, teacher.num_classes, (n,), generator=rng).to(device)
    if not getattr(teacher, "text_conditional", False):
        return None
    bank = getattr(getattr(teacher, "components", None), "prompts", None)
    if bank is None or len(bank) == 0:
        raise UserError("DisBack's recording on a text-to-image teacher needs the data's prompts; give --data a "
                        "folder with captions (img.png + img.txt, or metadata.jsonl / captions.txt)")
    idx = torch.randint(0, len(bank), (n,), generator=rng)
    return {k: v.to(device) for k, v in teacher.prompt_lookup(idx).items()}


def _drop_condition(teacher: Denoiser, cond: Any, drop: Tensor) -> Any:
    """``cond`` with the samples where ``drop`` is True set to the null condition (null class / empty prompt)."""
    null = teacher.null_cond(cond)
    if isinstance(cond, dict):
        return {k: torch.where(drop.view(-1, *([1] * (v.ndim - 1))), null[k].to(v.device, v.dtype), v)
                for k, v in cond.items()}
    return torch.where(drop, null.to(cond.device), cond)


def record_degradation_path(
    teacher: Denoiser,
    generator: Denoiser,
    timesteps: Tensor,
    settings: RecordSettings,
    root: str | Path,
    device: Any = None,
    progress: bool = False,
    head: HeadRecording | None = None,
) -> DegradationPath:
    """Stage 1 of DisBack: the teacher's degradation path towards ``generator``'s distribution, cached in ``root``.

    A copy ``D_deg`` of the teacher is trained with its denoising loss on samples of the frozen ``generator`` (its
    ``len(timesteps)``-step student sampler), and saved every ``settings.every`` iterations as ``D^(1..N)``. When
    ``root/<key>`` already holds this path (same teacher weights, generator weights, timesteps and settings) it is
    returned without training (``recorded`` False).

    With ``head`` (``head_along_path``) a copy of the GAN head trains with ``D_deg`` under DMD2's guidance loss: the
    denoising loss plus ``head.weight`` times the head's non-saturating loss on its features of diffused real data
    (drawn uniformly, with their labels) against diffused generator samples; ``head^(k)`` is saved beside ``D^(k)``
    and ``head^(0)`` is the head as given.

    Args:
        teacher: the teacher denoiser (not modified).
        generator: the initial generator denoiser (not modified).
        timesteps: the generator's sampling times ``t_1 > ... > t_k``.
        settings: the recording settings.
        root: the cache folder; the path goes to ``root/<key>/``.
        device: where to train (default: the teacher's device).
        progress: show a progress bar.
        head: record the GAN head too (see above), or None.
    """
    key = path_key(teacher, generator, timesteps, settings, head)
    cached = open_degradation_path(root, key, teacher)
    if cached is not None:
        return cached
    folder = Path(root) / key
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    schedule = teacher.schedule
    bf16 = settings.mixed_precision == "bf16"
    # D_deg trains in float32 (its optimizer state too) under bf16 autocast; the frozen generator is held in bf16,
    # as the loop holds frozen weights (fewstep.train.memory.cast_frozen_parameters)
    deg = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(deg)
    gen = copy.deepcopy(generator).to(device).eval().requires_grad_(False)
    if bf16:
        with torch.no_grad():
            for p in gen.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
    ts = timesteps.to(device)
    gan = copy.deepcopy(head.head).to(device).train().requires_grad_(True) if head is not None else None
    if gan is not None:
        _save_head(gan, folder / "head_000.safetensors")
    trained = [*deg.parameters(), *(gan.parameters() if gan is not None else [])]  # DMD2: one guidance optimizer
    opt = torch.optim.AdamW(trained, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
                            fused=True)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / settings.warmup)) \
        if settings.warmup > 0 else None
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    rng = torch.Generator().manual_seed(settings.seed)  # every draw of the recording comes from here
    n, shape = settings.batch_size, tuple(teacher.sample_shape)
    losses: list[float] = []
    window: list[float] = []
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.iterations, disable=not progress, desc="degradation recording", unit="it",
               dynamic_ncols=True)
    try:
        for i in range(settings.iterations):
            z = torch.randn((n, *shape), generator=rng)
            gen_cond = _draw_condition(teacher, n, rng, device)
            with torch.no_grad(), autocast():
                x0 = sample_student(gen, z.to(device), ts, gen_cond, generator=rng).float()
            t = schedule.sample_train_t(n, generator=rng).to(device)
            eps = torch.randn((n, *shape), generator=rng).to(device)
            cond = None
            if gen_cond is not None:
                drop = torch.rand(n, generator=rng) < settings.label_dropout
                cond = _drop_condition(teacher, gen_cond, drop.to(device))
            with autocast():
                loss = deg.denoising_loss(x0, t, eps, cond).mean()
            if gan is not None:
                assert head is not None
                idx = torch.randint(0, len(head.x), (n,), generator=rng)
                real_cond = None if head.labels is None else head.labels[idx].to(device)
                t_real, t_fake = (schedule.sample_train_t(n, generator=rng).to(device) for _ in range(2))
                x_real_t = schedule.add_noise(head.x[idx].to(device), torch.randn((n, *shape), generator=rng)
                                              .to(device), t_real)
                x_fake_t = schedule.add_noise(x0, torch.randn((n, *shape), generator=rng).to(device), t_fake)
                with autocast():
                    gan_d = nonsaturating_d_loss(gan(deg.features(x_real_t, t_real, real_cond)),
                                                 gan(deg.features(x_fake_t, t_fake, gen_cond)))
                loss = loss + head.weight * gan_d
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
            opt.step()
            if warm is not None:
                warm.step()
            window.append(float(loss.detach()))
            bar.update(1)
            if (i + 1) % settings.every == 0:
                k = (i + 1) // settings.every
                losses.append(sum(window) / len(window))
                window = []
                _save_checkpoint(deg, folder / f"step_{k:03d}.safetensors", {"path_key": key, "index": k,
                                                                               "iteration": i + 1})
                if gan is not None:
                    _save_head(gan, folder / f"head_{k:03d}.safetensors")
    finally:
        bar.close()
    info = {
        "format": PATH_FORMAT, "version": PATH_VERSION, "key": key, "checkpoints": settings.checkpoints,
        "settings": settings.as_dict(), "timesteps": [float(t) for t in timesteps.tolist()],
        "teacher_sha256": state_hash(teacher.net.state_dict()),
        "generator_sha256": state_hash(generator.net.state_dict()),
        "recording_loss": losses,  # mean denoising loss on initial-generator samples over each interval
        "iterations": settings.iterations, "seconds": round(time.perf_counter() - start, 3),
        "files": [f"step_{k:03d}.safetensors" for k in range(1, settings.checkpoints + 1)],
        "gan_head": head is not None,
    }
    atomic_write_json(folder / "path.json", info)  # written last: its presence marks a complete path
    return DegradationPath(folder, key, settings.checkpoints, teacher, recorded=True, info=info)


# ----------------------------------------------------------------------------------------------------------------
# The backtracking schedule
# ----------------------------------------------------------------------------------------------------------------
class Backtrack:
    """Which checkpoint is the target: stage ``s = 0 .. N-1`` targets ``D^(N-1-s)``, the last stage the teacher.

    :meth:`advance` is called at the start of an iteration with the position in the schedule's unit (every iteration
    with the iteration; every generator iteration with the generator updates before it): it moves on by ``every`` units since the stage began, or once the mean of
    the last ``window`` observed mismatches is below ``threshold``; the last stage is kept to the end. Its state
    (stage, the position the stage began at, the mismatches in the window) is checkpointed.
    """

    def __init__(self, checkpoints: int, every: int | None, threshold: float | None = None, window: int = 5) -> None:
        assert checkpoints >= 1 and (every is not None or threshold is not None)
        self.checkpoints, self.every, self.threshold, self.window = checkpoints, every, threshold, window
        self.stage, self.stage_start = 0, 0
        self.recent: list[float] = []
        self.switches: list[tuple[int, int]] = []  # (iteration, new stage), this session's switches

    @property
    def stages(self) -> int:
        return self.checkpoints

    @property
    def target_index(self) -> int:
        """k of the current target ``D^(k)``."""
        return self.checkpoints - 1 - self.stage

    @property
    def final(self) -> bool:
        return self.stage == self.stages - 1

    def order(self) -> list[int]:
        """The targets' indices, stage by stage: ``N-1, N-2, ..., 0``."""
        return [self.checkpoints - 1 - s for s in range(self.stages)]

    def observe(self, mismatch: float) -> None:
        if not self.final and math.isfinite(mismatch):
            self.recent = (self.recent + [float(mismatch)])[-self.window:]

    def advance(self, pos: int, it: int | None = None) -> bool:
        """Move to the stage position ``pos`` belongs to (``it``: the iteration, for :attr:`switches`; default
        ``pos``); True when the target changed."""
        it = pos if it is None else it
        moved = False
        if not self.final and self.every is not None and pos - self.stage_start >= self.every:
            k = min((pos - self.stage_start) // self.every, self.stages - 1 - self.stage)
            self._go(self.stage + k, self.stage_start + k * self.every, it)
            moved = True
        if (not self.final and self.threshold is not None and len(self.recent) >= self.window
                and sum(self.recent) / len(self.recent) < self.threshold):
            self._go(self.stage + 1, pos, it)
            moved = True
        return moved

    def _go(self, stage: int, start: int, it: int) -> None:
        self.stage, self.stage_start, self.recent = stage, start, []
        self.switches.append((it, stage))

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_start": self.stage_start, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stage = int(state["stage"])
        if not 0 <= stage < self.stages:
            raise UserError(f"the checkpoint's DisBack stage {stage} is outside this path's {self.stages} stages")
        self.stage, self.stage_start = stage, int(state["stage_start"])
        self.recent = [float(v) for v in state.get("recent", [])]


def _mean_over_processes(value: float) -> float:
    """The mean of ``value`` over processes (so every process switches at the same iteration)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def load_generator_weights(generator: Denoiser, source: str | Path) -> Path:
    """Load a trained student's network weights into ``generator`` (``init_generator``): ``source`` is a `fewstep
    distill` run directory (its ``student.safetensors``) or a ``.safetensors`` file; strict, one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.lora import load_network_state

    path = Path(source)
    if path.is_dir():
        path = path / "student.safetensors"
    elif path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise UserError(f"init_generator: {path} not found; give a `fewstep distill` run directory (with "
                        f"student.safetensors) or a .safetensors file of the generator's weights")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"init_generator: {path} is not a readable safetensors file ({e})") from None
    try:
        load_network_state(generator.net, state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"init_generator: {path} does not fit the generator (the teacher's network): {first}; give a "
                        f"student distilled from this teacher, with a full (not LoRA) generator") from None
    return path


def generator_warmup_updates(base_cfg: Any) -> int:
    """How many of its own updates the wrapped DMD2's generator warms up for (``warmup_iterations`` counted in
    ``warmup_unit``: updates, or loop iterations of which every ``ttur``-th is a generator update)."""
    w = int(base_cfg.warmup_iterations)
    return w if base_cfg.warmup_unit == "updates" else math.ceil(w / base_cfg.ttur)


def _warn_warmup_past_first_switch(cfg: DisBackConfig, base_cfg: Any) -> None:
    if cfg.base != "dmd2" or cfg.switch_every is None:
        return
    stage = cfg.switch_every if cfg.switch_unit == "generator_updates" else cfg.switch_every / base_cfg.ttur
    warm = generator_warmup_updates(base_cfg)
    if warm > stage:
        warnings.warn(f"DisBack: the generator's learning-rate warm-up ({warm} of its updates) lasts past the first "
                      f"switch ({stage:g} generator updates): the early targets are followed at a reduced rate",
                      stacklevel=3)


def default_path_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewstep" / "degradation_paths"


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------
class DisBackMethod(Method):
    """DisBack around ``cfg.base`` (see the module docstring): the wrapped method's players, updates and losses, with
    its real score swapped along the degradation path.

    The path is recorded (or found in the cache) when the loop moves the method to its device (:meth:`to`), after the
    run directory is checked; ``run_dir`` (set by the loop before that) is where it is stored unless ``path_dir`` is
    given.

    Args:
        teacher: the frozen teacher denoiser (never modified).
        cfg: the DisBack config.
    """

    #: the run directory, when the training loop tells the method (the path is stored there unless path_dir is set)
    run_dir: Path | None = None

    def __init__(self, teacher: Denoiser, cfg: DisBackConfig) -> None:
        self.cfg = cfg
        self.spec = BASES[cfg.base]
        base_cfg = cfg.base_config()
        self.base: Method = self.spec.method_cls()(teacher, base_cfg)
        self.teacher = teacher.eval().requires_grad_(False)
        if cfg.init_generator is not None:  # before the snapshot below: the path is recorded towards this student
            load_generator_weights(_unwrap(self.base.players[self.spec.generator_player].module).denoiser,
                                   cfg.init_generator)
        # the one frozen copy the checkpoints are loaded into, installed as the wrapped method's real score
        self.target: Denoiser = copy.deepcopy(teacher).eval().requires_grad_(False)
        setattr(self.base, self.spec.real_attr, self.target)
        if self.spec.rederive is not None:
            self.spec.rederive(self.base)
        self.players = self.base.players
        self.timesteps = self.base.timesteps
        self.backtrack = Backtrack(cfg.record_checkpoints, cfg.switch_every, cfg.switch_threshold, cfg.switch_window)
        self.generator_updates = 0  # the generator updates scheduled so far (switch_unit generator_updates)
        _warn_warmup_past_first_switch(cfg, base_cfg)
        lr = cfg.record_lr if cfg.record_lr is not None else float(self.spec.record_lr(base_cfg))
        precision = cfg.record_mixed_precision or ("bf16" if cfg.loop.mixed_precision == "bf16" else "no")
        checkpointing = (cfg.loop.gradient_checkpointing if cfg.record_gradient_checkpointing is None
                         else cfg.record_gradient_checkpointing)
        self.settings = RecordSettings(
            checkpoints=cfg.record_checkpoints, every=cfg.record_every, lr=lr,
            batch_size=cfg.record_batch_size or cfg.loop.batch_size, label_dropout=cfg.record_label_dropout,
            seed=cfg.record_seed, weight_decay=cfg.record_weight_decay, warmup=cfg.record_warmup,
            mixed_precision=precision, gradient_checkpointing=bool(checkpointing))
        # a snapshot: the recording needs the generator as it starts, whenever it runs (freed once the path is ready)
        self.initial_generator: Denoiser | None = copy.deepcopy(self.base.inference_model()).eval().requires_grad_(False)
        self.key = path_key(teacher, self.initial_generator, self.timesteps, self.settings)
        #: head_along_path: the head's recording (its key needs the data: set in prepare) and the k of every head^(k)
        #: restored in this session
        self.head_recording: HeadRecording | None = None
        self.head_restores: list[int] = []
        if cfg.head_along_path and (getattr(teacher, "text_conditional", False) or self.spec.head(self.base) is None):
            raise UserError("head_along_path: the recording trains DMD2's GAN head on labelled or unconditional "
                            "data; this teacher is text-to-image (or the method has no head): set head_along_path: "
                            "false")
        self.path: DegradationPath | None = None
        self._loaded: int | None = None  # k of the checkpoint now in self.target

    # --- the path -----------------------------------------------------------------------------------------------
    def path_root(self) -> Path:
        if self.cfg.path_dir is not None:
            return Path(self.cfg.path_dir)
        if self.run_dir is not None:
            return Path(self.run_dir) / "degradation_path"
        root = default_path_cache()
        warnings.warn(f"DisBack: no run directory and no path_dir given; caching the degradation path in {root}",
                      stacklevel=2)
        return root

    def prepare(self, device: Any = None) -> DegradationPath:
        """Record the degradation path (or find it in the cache), start the fake score from ``D^(N)`` and load the
        current target. Idempotent; the loop's call to :meth:`to` runs it."""
        if self.path is not None:
            return self.path
        from accelerate import PartialState

        device = device if device is not None else next(self.target.parameters()).device
        root = self.path_root()
        if self.cfg.head_along_path:
            self.head_recording = self._head_recording()
            assert self.initial_generator is not None
            self.key = path_key(self.teacher, self.initial_generator, self.timesteps, self.settings,
                                self.head_recording)
        state = PartialState()
        path = None
        if state.is_main_process:
            assert self.initial_generator is not None
            path = record_degradation_path(self.teacher, self.initial_generator, self.timesteps, self.settings, root,
                                           device=device, progress=self.cfg.loop.progress, head=self.head_recording)
            assert path.key == self.key
        state.wait_for_everyone()
        if path is None:
            path = open_degradation_path(root, self.key, self.teacher)
            if path is None:
                raise UserError(f"the degradation path {root / self.key} is not visible from process "
                                f"{state.process_index}; set path_dir to a folder every process shares")
        self.path = path
        self.initial_generator = None
        fake = self.spec.fake(self.base)
        if fake is not None:  # the fake score starts from D^(N): it already fits the initial generator
            path.load_into(fake, path.checkpoints)
        if self.cfg.head_along_path:  # and its head from head^(N), recorded on D^(N)'s features
            self.restore_head(path.checkpoints)
        self.head_recording = None  # the real data it held is the loop's; nothing else needs it
        self._loaded = None
        self._sync_target()
        if state.is_main_process and self.run_dir is not None:
            atomic_write_json(Path(self.run_dir) / "degradation_path.json",
                              {"dir": str(path.dir.resolve()), "key": path.key, "checkpoints": path.checkpoints,
                               "recorded_by_this_run": path.recorded,
                               "recording_iterations": self.settings.iterations if path.recorded else 0})
        return path

    def _head_recording(self) -> HeadRecording:
        data = self.dataset
        if data is None or getattr(data, "x", None) is None:
            raise UserError("head_along_path: the recording trains the GAN head on real data, but the method was "
                            "given none (the training loop sets it; from Python set method.dataset first)")
        labels = getattr(data, "labels", None) if self.teacher.num_classes > 0 else None
        if self.teacher.num_classes > 0 and labels is None:
            raise UserError("head_along_path: the teacher is class-conditional but the data has no labels; give "
                            "labelled data or set head_along_path: false")
        head = self.spec.head(self.base)
        assert head is not None
        return HeadRecording(_unwrap(head), data.x, labels, float(self.cfg.base_config().gan_head_weight))

    def restore_head(self, k: int) -> None:
        """Load ``head^(k)``, recorded along the path, into the wrapped method's GAN head (in place, strict: the
        optimizer keeps its parameters and their moments)."""
        assert self.path is not None
        head = self.spec.head(self.base)
        assert head is not None
        with torch.no_grad():
            head.load_state_dict(self.path.head_state(k), strict=True)
        self.head_restores.append(k)

    def _sync_target(self) -> None:
        """Load the current stage's checkpoint into the target copy when it is not there yet."""
        if self.path is None:
            self.prepare()
        k = self.backtrack.target_index
        if self._loaded != k:
            assert self.path is not None
            self.path.load_into(self.target, k)
            self._loaded = k

    # --- Method -------------------------------------------------------------------------------------------------
    def to(self, device: Any) -> "DisBackMethod":
        # record first, while everything else is still where it was built (the CPU): the GPU then holds only the
        # recording's own copy being trained and the initial generator (see RecordSettings.mixed_precision)
        self.prepare(device)
        self.base.to(device)
        self.target.to(device)
        return self

    def updates(self, it: int) -> list[str]:
        """The wrapped method's updates, after moving the target: by iteration, or (``generator_updates``) at the
        iterations where the generator updates, by the number of its updates before this one (so with TTUR 5 a
        switch every N generator updates happens at iteration 5N, on the update that first uses the new target)."""
        players = self.base.updates(it)
        generator = self.spec.generator_player in players
        moved = False
        if self.cfg.switch_unit == "iterations":
            moved = self.backtrack.advance(it, it)
        elif generator:
            moved = self.backtrack.advance(self.generator_updates, it)
        if generator:
            self.generator_updates += 1
        self._sync_target()
        if moved and self.cfg.head_along_path:  # a switch (not a resume's reload): the head recorded at the target
            self.restore_head(self.backtrack.target_index)
        return players

    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, Any]]:
        self._sync_target()
        loss, stats = self.base.loss(player, batch, it)
        if player == self.spec.generator_player:
            stats = dict(stats)
            value = stats.get(self.spec.mismatch_stat)
            if value is not None:
                mismatch = float(value.detach().float().item()) if torch.is_tensor(value) else float(value)
                self.backtrack.observe(_mean_over_processes(mismatch))
                stats.setdefault("score_mismatch", value)
            stats["stage"] = float(self.backtrack.stage)
        return loss, stats

    def inference_model(self) -> Denoiser:
        return self.base.inference_model()

    def extra_state(self) -> dict[str, Any]:
        return {"base": self.base.extra_state(),
                "disback": {**self.backtrack.state_dict(), "path_key": self.key,
                            "generator_updates": self.generator_updates, "switch_unit": self.cfg.switch_unit}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.base.load_extra_state(state.get("base", {}))
        if "disback" in state:
            saved = state["disback"]
            if saved.get("path_key") != self.key:
                raise UserError(f"the checkpoint was trained along degradation path {saved.get('path_key')}, but this "
                                f"run's teacher, initial generator and recording settings give {self.key}; resume "
                                f"with the config it was made with")
            unit = saved.get("switch_unit", "iterations")  # checkpoints before switch_unit counted iterations
            if unit != self.cfg.switch_unit:
                raise UserError(f"the checkpoint's DisBack schedule counts {unit}, this config's switch_unit is "
                                f"{self.cfg.switch_unit}; resume with switch_unit: {unit}")
            self.backtrack.load_state_dict(saved)
            self.generator_updates = int(saved.get("generator_updates", 0))
            self._loaded = None
            if self.path is not None:
                self._sync_target()


__all__ = [
    "DisBackConfig",
    "DisBackMethod",
    "BaseSpec",
    "BASES",
    "HeadRecording",
    "Backtrack",
    "DegradationPath",
    "RecordSettings",
    "generator_warmup_updates",
    "load_generator_weights",
    "path_key",
    "state_hash",
    "record_degradation_path",
    "open_degradation_path",
]
