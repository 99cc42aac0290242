"""ADD: adversarial diffusion distillation (Sauer et al. 2023, SDXL-Turbo; METHODS.md, "ADD").

Players: the **generator** ``G_theta`` (the student, initialised from the teacher) and the **discriminator**: light
trainable heads ``D_phi,k`` on the features ``F_k`` of a frozen feature network ``F``
(:mod:`fewstep.models.features`). The frozen teacher ``D_psi`` gives the score distillation target.

* Student input (ADD sec. 3.1): real data ``x0``, ``s`` drawn uniformly from ``T_student = {tau_1..tau_n}``
  (:func:`~fewstep.diffusion.samplers.student_timesteps` with ``n = student_times``), ``x_s = alpha_s x0 + sigma_s
  eps`` and ``x_hat = G(x_s, s, c)``. The first time ``tau_1 = T - 1`` is pure noise, as ADD enforces zero terminal
  SNR: ``x_s = sigma_s eps``, exactly where the sampler starts (on SD's schedule ``alpha_999 = 0.068``, so the
  plain formula would show the student part of ``x0`` there). The student then samples in ``steps`` steps from pure
  noise (1..4 for ADD's ``n = 4``).
* Adversarial loss (ADD eq. 2-3, hinge): generator ``L_adv = -sum_k D_k(F_k(x_hat))``; discriminator
  ``sum_k [max(0, 1 - D_k(F_k(x0))) + max(0, 1 + D_k(F_k(x_hat)))] + gamma R1`` with R1 on the heads' input
  features of real data. Heads are projection-conditioned on the class or the prompt (``c_text``: the pooled prompt
  embedding, or the mean of its token embeddings; :func:`~fewstep.models.discriminators.text_embedding`) and, for
  ``s < T``, on ``c_img``: the feature network's pooled embedding of the real ``x0`` the student's input was made
  from (the same ``c_text`` and ``c_img`` condition the real and the fake logit of a pair).
* Score distillation loss (ADD eq. 4-5): ``x_hat_t = alpha_t sg(x_hat) + sigma_t eps'`` -- the teacher sees only the
  diffused student sample -- ``x_psi = D_psi^w(x_hat_t, t, c)`` without gradient, and
  ``L_distill = E[c(t) || x_hat - sg(x_psi) ||^2]`` (:func:`score_distillation_loss`), on a latent teacher in its
  latent space or, as the paper does (sec. 3.1), on the VAE-decoded pixels of both (``distill_space``).
* Generator objective ``L_adv + lambda L_distill`` (``distill_weight``, 2.5 in the paper). Ablations: ``adversarial:
  false`` (distillation only) and ``distill_weight: 0`` (adversarial only).

The mathematics (weightings, the SDS equivalence, NFSD) are plain functions at the top of this module, tested in
``tests/test_add.py``.

Choices where the paper is silent or its scale is not ours (short digits trials, 1-step FID, n = 1000; the numbers
are in the config's help texts):

* Each head gives one logit per sample (its hidden map averaged over space before the projection), so the hinge and R1
  are per sample exactly as written above; StyleGAN-T's heads give one logit per token instead.
* ``L_distill``'s reduction over a sample's ``D`` dimensions is an option (``distill_reduction``): ``sum`` is the
  paper's ``d(x, y) = ||x - y||_2^2``; ``mean`` (the default for now, pending issue 17's sweep) divides it by ``D``, so
  there ``lambda`` acts as ``lambda / D`` of the paper's (2.5 / 64 on digits). Both average over the batch.
* Every ``log_every`` iterations (and the last) the generator logs the two terms' gradients on the student output
  ``x_hat`` (:func:`gradient_ratio`): ``grad_ratio = lambda ||dL_distill/dx_hat|| / ||dL_adv/dx_hat||`` and
  ``grad_cos``, their cosine. ``torch.autograd.grad`` with ``retain_graph``: no parameter gradient, no random draw,
  so the run's result is the same with or without it (not measured under ``loop.fsdp``).
* The discriminator updates first, then the student, every iteration (1:1); both use AdamW with betas (0, 0.99).
* An EMA of the student (0.99) is what is saved and sampled: it averaged out the GAN's oscillations (FID ~1.7 -> ~1.25).
* The heads learn at 10x the student's rate; a student learning rate of 3e-4 (instead of 1e-4) doubled the FID.
* Feature networks (``auto``): the teacher's encoder for images, digits included; a fixed random MLP for points. The
  paper's DINOv2 is independent of the generator and of the metric; the digits classifier is the network digits FID
  reads, so it is no default (linear CKA of pooled features with FID's on the digits train split: the teacher's
  encoder 0.35, a second classifier 0.89 with another seed, 0.73 with another architecture, an MLP: a classifier
  of the same labels learns nearly the metric's features). ``feature_network: digits`` keeps it as an option.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from ..config import RESOLUTION_DESCRIPTION, STRICT, TEACHER_DESCRIPTION, LoopConfig, _default_distill_loop
from ..diffusion.denoiser import Denoiser, _cat_cond, guided
from ..diffusion.samplers import initial_noise, student_timesteps
from ..diffusion.schedule import Schedule, bcast
from ..errors import UserError
from ..models.discriminators import ADDDiscriminator, hinge_g_loss, text_embedding
from ..models.features import DecodedFeatures, FeatureNetwork, build_feature_network
from ..models.lora import apply_lora, share_frozen_weights, trainable
from ..options import MAX_LR, MAX_RESOLUTION
from .base import Batch, Method, Player, batch_cond, is_conditional, warmup_schedule
from .dmd2 import Generator, _unwrap

WEIGHTINGS = ("exponential", "sds", "nfsd")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def _default_add_loop() -> LoopConfig:
    # the shared distillation loop (batch 64, checkpoints every 500, samples every 250), 1000 iterations
    return _default_distill_loop().model_copy(update={"iterations": 1000})


class ADDConfig(BaseModel):
    """ADD (Sauer et al. 2023): a student trained on noised real data with a hinge GAN whose discriminator is light
    heads on a frozen feature network, plus score distillation from the teacher. Ablations: ``distill_weight: 0``
    (adversarial only) and ``adversarial: false`` (distillation only)."""

    model_config = STRICT

    method: Literal["add"] = Field("add", description="The distillation method.")
    teacher: str = Field("digits", description=TEACHER_DESCRIPTION)
    data: str | None = Field(
        None, description="Real data the student is fed (noised) and the discriminator sees (default: the teacher's).")
    steps: int = Field(
        1, ge=1, le=8,
        description="Student sampling steps from pure noise (trailing spacing: 1 = 999; 2 = 999 499; 4 = 999 749 499 "
                    "249). Steps whose times lie in T_student (1, 2 and 4 with student_times 4) are the ones trained.")
    resolution: int | None = Field(None, ge=1, le=MAX_RESOLUTION, description=RESOLUTION_DESCRIPTION)
    student_times: int = Field(
        4, ge=1, le=8,
        description="n = |T_student|: training draws s uniformly from the n-step trailing grid (ADD: n = 4, "
                    "999 749 499 249, the first one pure noise under zero terminal SNR).")
    guidance_scale: float = Field(
        1.0, ge=1.0,
        description="CFG scale w of the teacher in x_psi (uncond + w (cond - uncond); 1 = none). NFSD uses it as its "
                    "guidance scale s.")
    adversarial: bool = Field(True, description="Train the discriminator and add L_adv (false: distillation only).")
    distill_weight: float = Field(
        2.5, ge=0,
        description="lambda in L = L_adv + lambda L_distill (ADD: 2.5; 0 = adversarial only). Its scale depends on "
                    "distill_reduction.")
    distill_reduction: Literal["sum", "mean"] = Field(
        "mean",
        description="How L_distill reduces the squared error over a sample's D dimensions: 'sum' is the paper's "
                    "d(x, y) = ||x - y||^2 (lambda as the paper's); 'mean' divides by D, so lambda acts as lambda / D "
                    "of the paper's (2.5 / 64 on digits: there the distillation gradient on x_hat measured ~5% of the "
                    "adversarial one). Default 'mean' (today's behaviour) until issue 17's sweep chooses; the run logs "
                    "generator/grad_ratio, lambda ||dL_distill/dx|| / ||dL_adv/dx||, to size lambda by.")
    weighting: Literal["exponential", "sds", "nfsd"] = Field(
        "exponential",
        description="c(t) of L_distill: 'exponential' c = alpha_t (ADD's default); 'sds' c = alpha_t sigma_t / 2, "
                    "whose gradient is DreamFusion's SDS with w(t) = sigma_t^2; 'nfsd' noise-free score distillation "
                    "(Katzir et al. 2023) with the SDS weight -- the negative prompt is the null class "
                    "(class-conditional teachers only).")
    distill_t_range: tuple[float, float] = Field(
        (0.02, 0.98),
        description="Share of the time range t of L_distill is drawn from uniformly (2%..98%, as DMD2/SDS practice: "
                    "the ends carry no signal -- sigma ~ 0 or alpha ~ 0).")
    distill_space: Literal["latent", "pixel"] = Field(
        "latent",
        description="Space of L_distill on a latent teacher: 'latent' (its samples as they are) or 'pixel' (the "
                    "student's and the teacher's x0 decoded by the frozen VAE, with gradient through the decoder; ADD "
                    "sec. 3.1: more stable gradients). On a pixel-space teacher both are the same.")
    nfsd_t_split: float = Field(
        0.2, gt=0, lt=1,
        description="NFSD: below this share of the time range delta_D is the unconditional prediction, above it "
                    "uncond - negative (Katzir et al.: t < 200 of 1000).")
    feature_network: Literal["auto", "digits", "teacher", "random", "timm"] = Field(
        "auto",
        description="Frozen feature network of the discriminator: 'digits' (the embedded digits classifier: 3 conv "
                    "layers + penultimate), 'teacher' (the teacher's encoder at a fixed small t, any data), 'random' "
                    "(a fixed random MLP, points only), 'timm' (DINOv2/ViT from timm_model + feature_weights). On latent "
                    "teachers 'digits' and 'timm' read the VAE-decoded images (gradient through the frozen decoder). "
                    "'auto': random for points, else teacher (digits too: 'digits' is the classifier digits FID reads, "
                    "so an adversarial term on it optimises the metric's own features). (On grid25 the random MLP "
                    "covered 25/25 modes at 1 step where the teacher's encoder, nearly blind off the data, left a "
                    "box of samples and 15/25.)")
    feature_weights: str | None = Field(
        None, description="Weights file of the feature network: the ViT's for 'timm' (required), the classifier's for "
                          "'digits' (default: the shipped one).")
    timm_model: str = Field("vit_small_patch14_dinov2.lvd142m", description="timm model name for feature_network 'timm'.")
    timm_layers: int = Field(4, ge=1, description="'timm': how many evenly spaced ViT blocks the heads read.")
    feature_resolution: int = Field(224, ge=14, description="'timm': the input side the ViT sees.")
    feature_t: float = Field(
        0.02, ge=0, le=1, description="'teacher': the fixed time of the encoder, as a share of the time range.")
    image_conditioning: bool = Field(
        True, description="Project the heads on c_img, the feature network's pooled embedding of x0, when s < T.")
    image_conditioning_min_alpha: float = Field(
        0.0, ge=0, le=1,
        description="c_img only where the student's input keeps this much of x0: alpha_s >= this (0: every s < T, "
                    "the paper's). Where alpha_s is small the heads know the x0 the input barely shows, and pull the "
                    "output to the x0 that best matches on average (benchmarks/add.py times; README, ADD).")
    head_width: int = Field(64, ge=8, description="Hidden width of each discriminator head.")
    r1_gamma: float = Field(
        1e-4, ge=0,
        description="gamma of the R1 penalty on the heads' input features (ADD: ~1e-5, helpful above 128px). Ours "
                    "sums ||dD_k/dF_k||^2 over the heads (~0.3-0.5 on digits), so 1e-4 keeps it a light safeguard; "
                    "a trial with 0.1 was no better (digits 1-step FID 1.31 vs 1.24 at 600 iterations).")
    lr_generator: float = Field(1e-4, gt=0, le=MAX_LR, description="AdamW learning rate of the student.")
    lr_discriminator: float = Field(
        1e-3, gt=0, le=MAX_LR,
        description="AdamW learning rate of the discriminator heads (light heads: 10x the student's).")
    adam_betas: tuple[float, float] = Field((0.0, 0.99), description="AdamW betas (both players; GAN practice).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_iterations: int = Field(20, ge=0, description="Linear learning-rate warm-up (updates of each player).")
    grad_clip: float | None = Field(10.0, gt=0, description="Max gradient norm (None = no clipping).")
    ema_decay: float | None = Field(
        0.99, ge=0, lt=1,
        description="EMA of the student, the network that is saved and sampled (None: the raw student). With the "
                    "loop's (1+n)/(10+n) warm-up; on digits it takes the 1-step FID from ~1.7 to ~1.25 at 600 "
                    "iterations by averaging out the GAN's oscillations.")
    lora_rank: int | None = Field(
        None, ge=1,
        description="Train the student as LoRA adapters of this rank on the frozen teacher (fewstep.models.lora; "
                    "the base weights are the teacher's, held once). None = full fine-tuning.")
    loop: LoopConfig = Field(default_factory=_default_add_loop, description="Training loop options.")

    @model_validator(mode="after")
    def _something_to_train(self) -> "ADDConfig":
        if not self.adversarial and self.distill_weight == 0:
            raise ValueError("adversarial: false with distill_weight: 0 leaves the student no loss; enable one")
        if self.steps > self.student_times:
            raise ValueError(f"steps {self.steps} is more than student_times {self.student_times}, the times ADD "
                             f"trains the student at; set student_times: {self.steps}, or pass --steps "
                             f"{self.student_times} or fewer")
        lo, hi = self.distill_t_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"distill_t_range must satisfy 0 <= lo < hi <= 1, got {self.distill_t_range}")
        return self


# ----------------------------------------------------------------------------------------------------------------
# The mathematics
# ----------------------------------------------------------------------------------------------------------------
def distillation_weight(alpha: Tensor, sigma: Tensor, weighting: str) -> Tensor:
    """``c(t)`` of ADD's distillation loss, per sample.

    * ``exponential``: ``c(t) = alpha_t`` (ADD sec. 3.3: higher noise levels contribute less).
    * ``sds`` and ``nfsd``: ``c(t) = alpha_t sigma_t / 2``. Derivation (ADD appendix): with
      ``x_t = alpha_t x_hat + sigma_t eps'`` the teacher's noise prediction is ``eps_hat = (x_t - alpha_t x_psi) /
      sigma_t``, so ``eps_hat - eps' = (alpha_t / sigma_t)(x_hat - x_psi) = -(alpha_t / sigma_t)(x_psi - x_hat)``.
      SDS (Poole et al. 2022, eq. 3) is ``grad_theta L_SDS = E[w(t)(eps_hat - eps') dx_hat/dtheta]`` with
      DreamFusion's ``w(t) = sigma_t^2``; ours is ``grad_theta c(t)||x_hat - sg(x_psi)||^2 =
      E[2 c(t)(x_hat - x_psi) dx_hat/dtheta]``. They are equal iff ``2 c(t) = w(t) alpha_t / sigma_t``, i.e.
      ``c(t) = alpha_t w(t) / (2 sigma_t) = alpha_t sigma_t / 2``. (With CFG the same holds for the guided
      ``eps_hat`` and ``x_psi``: both are the same affine map of each other at fixed ``x_t``.)
    """
    if weighting == "exponential":
        return alpha
    if weighting in ("sds", "nfsd"):
        return alpha * sigma / 2
    raise ValueError(f"unknown weighting {weighting!r}; use one of {WEIGHTINGS}")


REDUCTIONS = ("sum", "mean")


def distillation_loss(x_hat: Tensor, target: Tensor, c: Tensor, reduction: str = "mean") -> Tensor:
    """``mean_b c_b * d(x_hat_b, sg(target_b))``: ADD eq. 4 with ``d`` the squared error summed over the sample's
    ``D`` dimensions (``reduction`` ``sum``: the paper's ``||.||_2^2``) or averaged over them (``mean``: ``1/D`` of
    it, a weight that does not grow with resolution). The gradient w.r.t. ``x_hat_b`` is ``2 c_b (x_hat_b -
    target_b) / B`` (sum) or ``/ (B D)`` (mean)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    err = ((x_hat.float() - target.detach().float()) ** 2).flatten(1)
    per_sample = err.sum(1) if reduction == "sum" else err.mean(1)
    return (c.float() * per_sample).mean()


def gradient_ratio(x: Tensor, adv: Tensor, distill: Tensor, weight: float) -> dict[str, Tensor]:
    """How the two terms of ``L_adv + weight L_distill`` pull on ``x`` (the student output): ``grad_ratio = weight
    ||dL_distill/dx|| / ||dL_adv/dx||`` and ``grad_cos``, the cosine between the two gradients (norms over the whole
    batch), with ``grad_norm_adv`` and ``grad_norm_distill`` (the latter unweighted).

    ``torch.autograd.grad`` with ``retain_graph``: nothing reaches a parameter's ``.grad`` and the graph stays for the
    loss's own backward (the training step is unchanged)."""
    g_adv, g_dist = (torch.autograd.grad(term, x, retain_graph=True)[0].detach().float().flatten()
                     for term in (adv, distill))
    n_adv, n_dist = g_adv.norm(), g_dist.norm()
    return {"grad_ratio": weight * n_dist / n_adv.clamp_min(1e-30),
            "grad_cos": (g_adv @ g_dist) / (n_adv * n_dist).clamp_min(1e-30),
            "grad_norm_adv": n_adv, "grad_norm_distill": n_dist}


def nfsd_target(
    x_hat: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    eps: Tensor,
    cond_x0: Tensor,
    uncond_x0: Tensor,
    neg_x0: Tensor,
    small_t: Tensor,
    scale: float,
) -> Tensor:
    """The regression target that turns ADD's loss (with the SDS ``c(t)``) into noise-free score distillation.

    NFSD (Katzir et al. 2023, eq. 7-8) replaces SDS's ``eps_hat_w - eps'`` by ``delta_D + s delta_C`` with
    ``delta_C = eps(x_t; c) - eps(x_t; null)`` and ``delta_D = eps(x_t; null)`` for small ``t`` (``t < 200``),
    ``eps(x_t; null) - eps(x_t; neg)`` otherwise: ``grad = w(t)(delta_D + s delta_C) dx_hat/dtheta``. With the SDS
    ``c(t)`` the loss has gradient ``w(t)(alpha/sigma)(x_hat - target)``, so ``target = x_hat - (sigma/alpha)(delta_D
    + s delta_C)``; written with x0-predictions (``eps_a - eps_b = -(alpha/sigma)(D_a - D_b)`` at the same ``x_t``)
    this is, without dividing by ``alpha`` where it vanishes,

    * ``t >= split``: ``x_hat + (D_null - D_neg) + s (D_c - D_null)``;
    * ``t <  split``: ``D_null + s (D_c - D_null) - (sigma/alpha) eps'`` (``x_t / alpha = x_hat + (sigma/alpha) eps'``).

    For a class-conditional teacher the negative prompt is the null class (``neg_x0 = uncond_x0``), so above the split
    only the guidance term ``s delta_C`` remains.

    Args:
        x_hat: the student samples (detached here).
        alpha, sigma: per-sample ``alpha_t``, ``sigma_t``.
        eps: the noise ``eps'`` of ``x_t``.
        cond_x0, uncond_x0, neg_x0: the teacher's ``D(x_t, t, c)``, ``D(x_t, t, null)``, ``D(x_t, t, neg)``.
        small_t: per-sample bool, ``t < split``.
        scale: the guidance scale ``s``.
    """
    x_hat = x_hat.detach()
    a, s = bcast(alpha, x_hat), bcast(sigma, x_hat)
    guide = scale * (cond_x0 - uncond_x0)
    large = x_hat + (uncond_x0 - neg_x0) + guide
    small = uncond_x0 + guide - (s / a.clamp_min(1e-6)) * eps
    return torch.where(small_t.reshape(-1, *([1] * (x_hat.ndim - 1))), small, large)


def score_distillation_loss(
    teacher: Denoiser,
    x_hat: Tensor,
    t: Tensor,
    eps: Tensor,
    cond: Any = None,
    weighting: str = "exponential",
    guidance_scale: float = 1.0,
    nfsd_split: float | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    decoded: Tensor | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADD's score distillation loss for student samples ``x_hat`` at times ``t`` with noise ``eps'`` (caller-drawn).

    ``x_hat_t = alpha_t sg(x_hat) + sigma_t eps'`` is all the teacher ever sees (a clean sample is out of its
    distribution, ADD sec. 3.3); its prediction is taken without gradient, so the gradient reaches the student only
    through the first argument of ``||x_hat - sg(x_psi)||^2``.

    Args:
        teacher: the frozen teacher denoiser (CFG is applied here with ``guidance_scale``).
        x_hat: student samples (with gradient).
        t: per-sample native times.
        eps: ``eps'``, shaped like ``x_hat``.
        cond: the condition (class labels), or None.
        weighting: ``exponential``, ``sds`` or ``nfsd`` (:func:`distillation_weight`).
        guidance_scale: the teacher's CFG scale ``w`` (NFSD's ``s``).
        nfsd_split: NFSD's split time in native units (``t < split`` is "small").
        decode: pixel-space loss: ``c(t) || decode(x_hat) - sg(decode(x_psi)) ||^2`` (a latent teacher's VAE
            decoding with gradient); None = in the samples' own space.
        decoded: ``decode(x_hat)`` when the caller has it already (ADD's pixel feature networks read it too).
        reduction: ``sum`` or ``mean`` over a sample's dimensions (:func:`distillation_loss`).

    Returns:
        The loss and stats: ``distill`` (the loss) and ``distill_mse`` (the unweighted mean squared residual).
    """
    schedule: Schedule = teacher.schedule
    alpha, sigma = (v.to(x_hat.device) for v in schedule.alpha_sigma(t))
    x_t = schedule.add_noise(x_hat.detach(), eps, t)
    with torch.no_grad():
        if weighting == "nfsd":
            if cond is None:
                raise UserError("weighting 'nfsd' needs a conditional teacher (class labels or prompts, and their "
                                "null); use weighting: exponential or sds")
            assert nfsd_split is not None
            null = teacher.null_cond(cond)
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(cond, null))
            cond_x0, uncond_x0 = both.chunk(2)
            target = nfsd_target(x_hat, alpha, sigma, eps, cond_x0, uncond_x0, uncond_x0, t < nfsd_split,
                                 guidance_scale)
        else:
            target = guided(teacher, guidance_scale)(x_t, t, cond)
    c = distillation_weight(alpha, sigma, weighting)
    pred = x_hat
    if decode is not None:  # pixel space: both x0 decoded; the gradient reaches x_hat through the frozen decoder
        pred = decoded if decoded is not None else decode(x_hat)
        with torch.no_grad():
            target = decode(target)
    loss = distillation_loss(pred, target, c, reduction)
    mse = (pred.detach().float() - target.float()).pow(2).mean()
    return loss, {"distill": loss.detach(), "distill_mse": mse}


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------
class ADDMethod(Method):
    """ADD as a method of the training loop (see the module docstring).

    Each iteration the discriminator updates, then the student (1:1 alternation, as StyleGAN-T/ADD); each player's
    loss draws its own ``s``, ``eps``, ``t``, ``eps'`` from the loop's per-iteration RNG state.

    Args:
        teacher: the frozen teacher denoiser.
        cfg: the ADD config.
    """

    def __init__(self, teacher: Denoiser, cfg: ADDConfig) -> None:
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.schedule = teacher.schedule
        self.timesteps = student_timesteps(self.schedule, cfg.steps)
        self.train_timesteps = student_timesteps(self.schedule, cfg.student_times)
        self.conditional = is_conditional(teacher)
        if cfg.weighting == "nfsd" and cfg.distill_weight > 0 and not self.conditional:
            raise UserError("weighting 'nfsd' needs a conditional teacher (class labels or prompts, and their null); "
                            "use weighting: exponential or sds")
        split = self.schedule.from_fraction(torch.tensor([cfg.nfsd_t_split]))
        self.nfsd_split = float(split.round() if self.schedule.kind == "ddpm" else split)

        g_mod = Generator(copy.deepcopy(teacher).train().requires_grad_(True))
        if cfg.lora_rank is not None:  # a LoRA student whose frozen base weights are the teacher's own
            share_frozen_weights(apply_lora(g_mod.denoiser, cfg.lora_rank), self.teacher)
        self.features: FeatureNetwork | None = None
        modules: dict[str, tuple[nn.Module, float]] = {"generator": (g_mod, cfg.lr_generator)}
        if cfg.adversarial:
            self.features = build_feature_network(
                self._feature_network_name(), teacher, weights=cfg.feature_weights, teacher_t=cfg.feature_t,
                timm_model=cfg.timm_model, timm_layers=cfg.timm_layers, resolution=cfg.feature_resolution,
                seed=cfg.loop.seed)
            shapes, img_dim = self.features.shapes(teacher.sample_shape)
            null_text = text_embedding(teacher.null_cond(1)) if getattr(teacher, "text_conditional", False) else None
            disc = ADDDiscriminator(shapes, cfg.head_width, teacher.num_classes,
                                    img_dim if cfg.image_conditioning else 0,
                                    0 if null_text is None else int(null_text.shape[1]))
            modules["discriminator"] = (disc, cfg.lr_discriminator)
        # a latent teacher's samples decoded once per generator step, with gradient, for whatever reads pixels: the
        # pixel feature networks (DecodedFeatures) and a pixel-space L_distill
        self.decoded_features = isinstance(self.features, DecodedFeatures)
        self.pixel_distill = cfg.distill_space == "pixel" and bool(getattr(teacher, "latent", False))
        self.decode: Callable[[Tensor], Tensor] | None = None
        if self.decoded_features or self.pixel_distill:
            self.decode = teacher.components.decode_with_grad
            vae = teacher.components.vae
            if cfg.loop.gradient_checkpointing and getattr(vae, "_supports_gradient_checkpointing", False):
                vae.enable_gradient_checkpointing()  # only acts under autograd: sampling's decodes are unchanged

        def player(module: nn.Module, lr: float) -> Player:
            # fused: one kernel for all parameters (as DMD2's; per tensor it was ADD's largest non-network cost)
            opt = torch.optim.AdamW(trainable(module), lr=lr, betas=tuple(cfg.adam_betas),
                                    weight_decay=cfg.weight_decay, fused=True)
            return Player(module, opt, warmup_schedule(opt, cfg.warmup_iterations), cfg.grad_clip,
                          cfg.ema_decay if module is g_mod else None)

        self.players = {name: player(m, lr) for name, (m, lr) in modules.items()}

    def _feature_network_name(self) -> str:
        name = self.cfg.feature_network
        if name != "auto":
            return name
        # never the digits classifier: it is the feature network of digits FID (module docstring)
        return "random" if len(tuple(self.teacher.sample_shape)) == 1 else "teacher"

    def to(self, device: Any) -> "ADDMethod":
        self.teacher.to(device)
        if self.features is not None:
            self.features.to(device)
        return self

    # --- schedule of updates ------------------------------------------------------------------------------------
    def updates(self, it: int) -> list[str]:
        return ["discriminator", "generator"] if self.cfg.adversarial else ["generator"]

    # --- pieces -------------------------------------------------------------------------------------------------
    def _cond(self, batch: Batch) -> Any:
        return batch_cond(batch, self.teacher)

    def _student_input(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_s, s)``: ``s`` uniform over ``T_student`` per sample, ``x_s = alpha_s x0 + sigma_s eps``; at the
        first time, pure noise ``sigma_s eps`` (zero terminal SNR: the sampler's own start, whatever ``alpha_s``)."""
        ts = self.train_timesteps.to(x0.device)
        s = ts[torch.randint(0, len(ts), (x0.shape[0],), device=x0.device)]
        eps = torch.randn_like(x0)
        first = (s == ts[0]).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.where(first, initial_noise(self.schedule, eps, ts[0]), self.schedule.add_noise(x0, eps, s)), s

    def _t_distill(self, n: int, device: Any) -> Tensor:
        lo, hi = self.cfg.distill_t_range
        t = self.schedule.from_fraction(lo + (hi - lo) * torch.rand(n, device=device)).to(device)
        return t.round() if self.schedule.kind == "ddpm" else t

    def _image_embedding(self, pooled: Tensor, s: Tensor) -> Tensor | None:
        """``c_img`` of the real ``x0`` for samples with ``s < T`` (and ``alpha_s >= image_conditioning_min_alpha``),
        zero where the student saw pure noise."""
        if not self.cfg.image_conditioning:
            return None
        keep = s < self.train_timesteps[0].to(s.device)
        if self.cfg.image_conditioning_min_alpha > 0:
            keep = keep & (self.schedule.alpha_sigma(s)[0].to(s.device) >= self.cfg.image_conditioning_min_alpha)
        return pooled * keep.to(pooled.dtype)[:, None]

    @staticmethod
    def _disc_cond(cond: Any) -> tuple[Tensor | None, Tensor | None]:
        """The heads' conditions: class labels, or ``c_text`` of a prompt condition."""
        return (cond if torch.is_tensor(cond) else None), text_embedding(cond)

    # --- losses -------------------------------------------------------------------------------------------------
    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, float]]:
        return self._generator_loss(batch, it) if player == "generator" else self._discriminator_loss(batch)

    def ratio_due(self, it: int) -> bool:
        """Whether iteration ``it`` logs the two terms' gradient ratio (both terms on; every ``log_every``-th
        iteration, the rows the loop logs, and the last). Not under ``loop.fsdp``: a gradient taken on a sharded
        module's output would run FSDP's backward hooks ahead of the step's own backward (untested there)."""
        loop = self.cfg.loop
        return (self.cfg.adversarial and self.cfg.distill_weight > 0 and it >= 0 and not loop.fsdp
                and ((it + 1) % loop.log_every == 0 or it + 1 == loop.iterations))

    def _generator_loss(self, batch: Batch, it: int = -1) -> tuple[Tensor, dict[str, Any]]:
        gen = self.players["generator"].module
        cond = self._cond(batch)
        x_s, s = self._student_input(batch.x0)
        x_hat = gen(x_s, s, cond)
        loss = x_hat.new_zeros(())
        stats: dict[str, Any] = {}
        adv = dist = None
        pixels = self.decode(x_hat) if self.decode is not None else None  # with gradient through the frozen VAE
        if self.cfg.adversarial:
            assert self.features is not None
            disc = _unwrap(self.players["discriminator"].module)  # not updated here: bypass DDP
            c_img = None
            if self.cfg.image_conditioning:
                with torch.no_grad():
                    c_img = self._image_embedding(self.features(batch.x0)[1], s)
            # the frozen network passes the gradient to x_hat
            if self.decoded_features:
                assert isinstance(self.features, DecodedFeatures) and pixels is not None
                fake_layers, _ = self.features.inner(pixels)
            else:
                fake_layers, _ = self.features(x_hat)
            labels, c_text = self._disc_cond(cond)
            logits = disc.logits(fake_layers, labels, c_img, c_text)
            adv = sum(hinge_g_loss(lg) for lg in logits)
            loss = loss + adv
            stats["adv"] = adv.detach()
        if self.cfg.distill_weight > 0:
            t = self._t_distill(x_hat.shape[0], x_hat.device)
            dist, dstats = score_distillation_loss(
                self.teacher, x_hat, t, torch.randn_like(x_hat), cond, self.cfg.weighting, self.cfg.guidance_scale,
                self.nfsd_split, self.decode if self.pixel_distill else None, pixels, self.cfg.distill_reduction)
            loss = loss + self.cfg.distill_weight * dist
            stats.update(dstats)
        if adv is not None and dist is not None and self.ratio_due(it) and x_hat.requires_grad:
            stats.update(gradient_ratio(x_hat, adv, dist, self.cfg.distill_weight))
        stats["recon_mse"] = F.mse_loss(x_hat.detach().float(), batch.x0.float())  # how much of x0 survives s
        return loss, stats

    def _discriminator_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
        assert self.features is not None
        gen = self.players["generator"].module
        cond = self._cond(batch)
        with torch.no_grad():
            x_s, s = self._student_input(batch.x0)
            x_hat = gen(x_s, s, cond)
            real_layers, pooled = self.features(batch.x0)
            fake_layers, _ = self.features(x_hat)
        labels, c_text = self._disc_cond(cond)
        return self.players["discriminator"].module(real_layers, fake_layers, labels, self._image_embedding(pooled, s),
                                                    self.cfg.r1_gamma, c_text)

    # --- outputs ------------------------------------------------------------------------------------------------
    def inference_model(self) -> Denoiser:
        player = self.players["generator"]
        module = player.ema if player.ema is not None else _unwrap(player.module)
        return module.denoiser


__all__ = [
    "ADDConfig",
    "ADDMethod",
    "WEIGHTINGS",
    "distillation_weight",
    "distillation_loss",
    "gradient_ratio",
    "nfsd_target",
    "score_distillation_loss",
]
