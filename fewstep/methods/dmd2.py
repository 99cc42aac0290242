"""DMD2: improved distribution matching distillation (Yin et al. 2024; METHODS.md, "DMD2").

Players: the **generator** ``G`` (initialised from the teacher) and the **guidance** player: the fake score
``D_fake`` (initialised from the teacher, trained online on generator samples) with the GAN classifier head on its
bottleneck features. The frozen teacher ``D_real`` gives the real score, with CFG.

* Generator: ``L_dm + lambda_G L_gan`` where ``L_dm = 0.5 || x - sg(x - grad) ||^2`` and
  ``grad = (p_real - p_fake) / mean|p_real|`` with ``p = x - D(x_t, t)`` (DMD2 eq. 2, DMD eq. 7-8).
* Guidance: the fake score's denoising loss on detached generator samples, plus ``w_head`` times the head's
  non-saturating loss on diffused real data against diffused generator samples. On an iteration where the generator
  updates, those are the samples its loss drew (before its step, as the DMD2 code): no second generator forward.
* Fake-score noise levels (``fake_t_distribution``): the teacher's training distribution with its own loss, or the
  DMD2 EDM code's uniform index over 1,000 Karras sigmas with EDM's weight on the x0 error
  (:func:`karras_index_times`, :func:`x0_denoising_loss`).
* TTUR (``ttur``): the guidance player updates every iteration, the generator every ``ttur``-th (DMD2 code).
* Schedules: the GAN can start at a later iteration (``gan_start_iteration``, optionally with its own learning rate
  ``gan_stage_lr``: DMD2's SD 1.5 GAN resume in one run), and the warm-up counts player updates or loop iterations
  (``warmup_unit``; :func:`lr_factor`).
* LoRA (``lora_rank``, ``lora_alpha``) on the players named in ``lora_players``; the others train in full.
* Backward simulation: a k-step generator's training input ``x_{t_i}`` comes from its own sampler (no gradient),
  not from noised data (DMD2 sec. 4.5; :func:`backward_simulation`).
* Per-step fake score (``fake_score: per_step``, the default for k > 1; ours, issue 16): one shared fake score (the
  DMD2 code) models the mixture of the k steps' outputs, so only the mixture is matched to the data and the last
  step can collapse. Here the fake network carries one LoRA adapter per step (``fake_step_rank``) on its trunk, each
  iteration splits the batch evenly over the steps, and step ``i``'s samples are denoised, scored (DM gradient) and
  judged (the GAN head on its features) by ``fake_i = trunk + delta_i`` alone. ``shared`` keeps one fake score and one
  random step per batch.
* Per-step diagnostics: a k-step run measures each step's output at every log row (:meth:`step_diagnostics`).
* DMD (v1) ablation: no TTUR, no GAN, plus an L2 regression to teacher ODE pairs (Yin et al. 2023, eq. 9).

The distribution-matching mathematics are plain functions (:func:`distribution_matching_grad`,
:func:`distribution_matching_loss`) so they can be tested against closed-form Gaussian scores.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DMD2Config
from ..diffusion.denoiser import Denoiser, guided
from ..diffusion.samplers import _randn_like, initial_noise, sample as teacher_sample, sample_student, student_timesteps
from ..models.discriminators import FeatureHead, nonsaturating_d_loss, nonsaturating_g_loss
from ..models.lora import (active_adapter_names, active_adapters, add_adapters, apply_lora, share_frozen_weights,
                           trainable)
from .base import Batch, Method, Player, batch_cond


# ----------------------------------------------------------------------------------------------------------------
# The mathematics
# ----------------------------------------------------------------------------------------------------------------
def distribution_matching_grad(x: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """DMD's per-sample normalised gradient of KL(p_fake || p_real) w.r.t. the generator output ``x``.

    ``p_real = x - D_real(x_t)``, ``p_fake = x - D_fake(x_t)``; ``grad = (p_real - p_fake) / mean|p_real|`` with the
    mean over all non-batch dimensions (DMD eq. 8's weighting); NaN/inf are replaced by 0. Gradient *descent* along it
    moves ``x`` towards ``D_real`` and away from ``D_fake``: ``p_real - p_fake = D_fake - D_real``.
    """
    p_real = x - real_x0
    p_fake = x - fake_x0
    weight = p_real.abs().flatten(1).mean(1).clamp_min(1e-12)
    grad = (p_real - p_fake) / weight.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean (x - sg(x - grad))^2``: its gradient w.r.t. ``x`` is ``grad / x.numel()`` (DMD2 code)."""
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")


def karras_index_times(schedule: Any, n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
                       rho: float = 7.0) -> Tensor:
    """The fake score's noise levels in the DMD2 EDM code (``karras_sigmas``, drawn by a uniform index): ``n`` Karras
    sigmas (Karras et al. 2022, eq. 5, in EDM sigma = ``sigma_t / alpha_t``), as native times of ``schedule``,
    noisiest first. A DDPM schedule's are rounded to the nearest timestep (the ones its networks trained at); its
    finite range clamps the ends (zero terminal SNR: sigma 80 is t = 885, and sigmas under t = 0's 0.01 become 0)."""
    t = schedule.karras(n, sigma_min, sigma_max, rho)
    return (t.round() if schedule.kind == "ddpm" else t).float()


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss weight on the x0 error, ``lambda(sigma) = 1 / sigma^2 + 1 / sigma_data^2`` (Karras et al. 2022,
    Table 1; the DMD2 EDM code's ``snrs + 1 / sigma_data^2``)."""
    return sigma.pow(-2) + sigma_data**-2


def x0_denoising_loss(denoiser: Any, x0: Tensor, t: Tensor, eps: Tensor, cond: Any, sigma_data: float) -> Tensor:
    """Per sample, ``lambda(sigma) mean (D(x_t, t) - x0)^2`` at ``x_t = add_noise(x0, eps, t)`` with ``sigma`` =
    ``sigma_t / alpha_t`` and ``lambda`` = :func:`edm_weight` (the DMD2 EDM code's fake-score loss). On an EDM-
    preconditioned denoiser it is the denoiser's own F-MSE (``lambda c_out^2 = 1``)."""
    x_t = denoiser.schedule.add_noise(x0, eps, t)
    err = (denoiser(x_t, t, cond).float() - x0.float()) ** 2
    sigma = denoiser.schedule.sigma_tilde(t).float().to(err.device)
    return edm_weight(sigma, sigma_data) * err.flatten(1).mean(1)


def step_groups(steps: list[int]) -> list[tuple[int, slice]]:
    """``(step, slice)`` of each run of equal steps in ``steps`` (sorted: each step's samples are contiguous)."""
    assert steps == sorted(steps)
    out: list[tuple[int, slice]] = []
    start = 0
    for b in range(1, len(steps) + 1):
        if b == len(steps) or steps[b] != steps[start]:
            out.append((steps[start], slice(start, b)))
            start = b
    return out


def split_steps(n: int, k: int) -> list[int]:
    """The student step of each of ``n`` samples when a batch is split evenly over ``k`` steps (sorted)."""
    return [b * k // n for b in range(n)]


def take(cond: Any, sl: slice) -> Any:
    """The samples ``sl`` of a condition: None, a tensor, or a dict of tensors (prompt embeddings)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: take(v, sl) for k, v in cond.items()}
    return cond[sl]


def backward_simulation(gen: Any, schedule: Any, z: Tensor, ts: Tensor, steps: list[int], cond: Any = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """Sample ``b``'s output of student step ``steps[b]`` (0-based, sorted) from noise ``z``: the k-step student
    sampler (:func:`fewstep.diffusion.samplers.sample_student`: the same computation and, for the same ``generator``,
    the same noise, each re-noising drawing noise for the whole batch) run for ``steps[b] + 1`` steps, with gradient
    only through each sample's last generator call (DMD2 sec. 4.5's backward simulation)."""
    n, last = z.shape[0], max(steps)
    x = initial_noise(schedule, z, ts[0])  # the inputs of samples [done, n) at step j
    out: list[Tensor] = []
    done = 0  # samples [0, done) have their output
    for j in range(last + 1):
        end = done + steps.count(j)
        t = ts[j].to(x.device).float().expand(n - done)
        if end > done:  # the samples whose step is j: their output, with gradient
            out.append(gen(x[: end - done], t[: end - done], take(cond, slice(done, end))))
        if j == last:
            break
        with torch.no_grad():
            x0 = gen(x[end - done:], t[end - done:], take(cond, slice(end, n)))
        eps = _randn_like(x.new_empty((n, *x.shape[1:])), generator)[end:]
        x = schedule.add_noise(x0, eps, ts[j + 1].to(x.device).float().expand(n - end))
        done = end
    return torch.cat(out)


def lr_factor(update: int, stride: int, cfg: DMD2Config, base_lr: float) -> float:
    """The learning-rate factor (of ``base_lr``) of a player's ``update``-th update, 0-based.

    The player updates every ``stride``-th loop iteration (the generator: ``ttur``; the guidance player: 1), so that
    update happens at iteration ``update * stride``. Warm-up: linear over ``warmup_iterations`` of ``warmup_unit``
    (player updates, or loop iterations); from ``gan_start_iteration`` on, ``gan_stage_lr / base_lr`` if set.
    """
    it = update * stride
    w = cfg.warmup_iterations
    count = it if cfg.warmup_unit == "iterations" else update
    factor = 1.0 if w == 0 else min(1.0, (count + 1) / w)
    if cfg.gan and cfg.gan_stage_lr is not None and it >= cfg.gan_start_iteration:
        factor *= cfg.gan_stage_lr / base_lr
    return factor


# ----------------------------------------------------------------------------------------------------------------
# Players as modules whose forward is the whole computation (the loop averages their gradients across processes)
# ----------------------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """The generator denoiser; ``forward(x_t, t, cond) -> x0_hat``."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.denoiser(x_t, t, cond)


def _selecting(fake: nn.Module, names: list[str]) -> Any:
    """A gradient hook on one step's output that selects that step's adapters before autograd runs back through the
    call (and recomputes its checkpointed blocks). Autograd runs the nodes of later calls first (its ready queue is
    ordered by creation), so each call's backward runs whole, after its own hook (tested against a run without
    checkpointing)."""
    from ..models.lora import select_adapters

    return lambda grad: select_adapters(fake, names)


def step_adapter(i: int) -> str:
    """The name of student step ``i``'s (0-based) adapter on a per-step fake score."""
    return f"step{i + 1}"


class Guidance(nn.Module):
    """The fake score and the GAN head; ``forward`` returns the guidance player's losses.

    Per-step fake score (``steps`` > 0): ``fake`` carries one LoRA adapter per student step on its trunk, and every call
    takes the samples' ``groups`` (``(step, slice)`` from :func:`step_groups`): step ``i``'s samples are scored by
    ``fake_i`` = trunk + adapter ``i`` (and the head on ``fake_i``'s features). ``steps`` = 0: one shared fake score,
    ``groups`` ignored. ``x0_loss_sigma_data``: the denoising loss is :func:`x0_denoising_loss` with that
    ``sigma_data`` (``fake_t_distribution: uniform_index``); None: the fake score's own loss.
    """

    def __init__(self, fake: Denoiser, head: FeatureHead | None, steps: int = 0,
                 x0_loss_sigma_data: float | None = None) -> None:
        super().__init__()
        self.fake = fake
        self.head = head
        self.steps = steps
        self.x0_loss_sigma_data = x0_loss_sigma_data
        self.trunk_adapters = active_adapter_names(fake.net)  # a LoRA fake score's own adapter, or none

    def _by_step(self, fn: Any, groups: list[tuple[int, slice]] | None, *args: Any) -> Tensor:
        """``fn(*args)`` with each step's samples on its own fake score, reassembled in batch order."""
        if not self.steps or groups is None:
            return fn(*args)
        outs = []
        for i, sl in groups:
            names = [*self.trunk_adapters, step_adapter(i)]
            with active_adapters(self.fake, names):
                out = fn(*(take(a, sl) for a in args))
            if out.requires_grad:  # gradient checkpointing recomputes this call in backward: with the same adapters
                out.register_hook(_selecting(self.fake, names))
            outs.append(out)
        return torch.cat(outs)

    def _denoising_loss(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Any) -> Tensor:
        if self.x0_loss_sigma_data is None:
            return self.fake.denoising_loss(x0, t, eps, cond)
        return x0_denoising_loss(self.fake, x0, t, eps, cond, self.x0_loss_sigma_data)

    def score(self, x_t: Tensor, t: Tensor, cond: Any, groups: list[tuple[int, slice]] | None = None) -> Tensor:
        """The fake score's ``x0`` prediction (step ``i``'s samples: ``fake_i``)."""
        return self._by_step(self.fake, groups, x_t, t, cond)

    def logits(self, x_t: Tensor, t: Tensor, cond: Any, groups: list[tuple[int, slice]] | None = None) -> Tensor:
        assert self.head is not None
        return self._by_step(lambda *a: self.head(self.fake.features(*a)), groups, x_t, t, cond)

    def forward(
        self, x_fake: Tensor, cond_fake: Any, t: Tensor, eps: Tensor, gan_inputs: tuple[Tensor, ...] | None = None,
        groups: list[tuple[int, slice]] | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Denoising loss on generator samples, and (given ``(x_real_t, cond_real, t_real, x_fake_t, t_fake)``) the
        head's loss with its logits on real and fake inputs. ``groups``: the samples' steps (real samples are split
        the same way, so each step's head compares its own outputs with data)."""
        denoise = self._by_step(self._denoising_loss, groups, x_fake, t, eps, cond_fake).mean()
        if gan_inputs is None or self.head is None:
            return denoise, None, None, None
        x_real_t, cond_real, t_real, x_fake_t, t_fake = gan_inputs
        real_logits = self.logits(x_real_t, t_real, cond_real, groups)
        fake_logits = self.logits(x_fake_t, t_fake, cond_fake, groups)
        return denoise, nonsaturating_d_loss(real_logits, fake_logits), real_logits, fake_logits


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP/compile wrappers (the loop prepares players with Accelerate)."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


class DMD2Method(Method):
    """DMD2 as a method of the training loop (see the module docstring).

    Args:
        teacher: the frozen teacher denoiser (the real score).
        cfg: the DMD2 config.
    """

    def __init__(self, teacher: Denoiser, cfg: DMD2Config) -> None:
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.real = guided(self.teacher, cfg.guidance_scale)
        self.schedule = teacher.schedule
        self.timesteps = student_timesteps(self.schedule, cfg.steps)

        generator = copy.deepcopy(teacher).train().requires_grad_(True)
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        if cfg.lora_rank is not None:  # LoRA players whose frozen base weights are the teacher's own
            for name, copy_ in (("generator", generator), ("fake_score", fake)):
                if name in cfg.lora_players:
                    share_frozen_weights(apply_lora(copy_, cfg.lora_rank, cfg.lora_alpha), self.teacher)
        # per-step fake score: one adapter per student step on the fake score's trunk (B = 0: each starts as it)
        self.per_step = cfg.fake_score == "per_step" and cfg.steps > 1
        if self.per_step:
            add_adapters(fake, [step_adapter(i) for i in range(cfg.steps)], cfg.fake_step_rank)
        head = None
        if cfg.gan:
            probe = torch.zeros((1, *teacher.sample_shape))
            with torch.no_grad():
                feats = fake.features(probe, torch.tensor([self.schedule.t_max]), None)
            head = FeatureHead(feats.shape[1], feats.shape[-1] if feats.ndim == 4 else 0)
        # the fake score's noise levels: the teacher's training draw, or the DMD2 EDM code's Karras grid
        self.fake_times = karras_index_times(self.schedule) if cfg.fake_t_distribution == "uniform_index" else None
        sigma_data = getattr(self.schedule, "sigma_data", 0.5) if self.fake_times is not None else None
        g_mod = Generator(generator)
        f_mod = Guidance(fake, head, cfg.steps if self.per_step else 0, x0_loss_sigma_data=sigma_data)

        def player(module: nn.Module, lr: float, stride: int) -> Player:
            # fused: one kernel for all parameters (the digits UNet, one CPU thread: 1.6 ms a step, 8.1 per tensor)
            opt = torch.optim.AdamW(trainable(module), lr=lr, betas=tuple(cfg.adam_betas),
                                    weight_decay=cfg.weight_decay, fused=True)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, stride, cfg, lr))
            return Player(module, opt, schedule, cfg.grad_clip, cfg.ema_decay if module is g_mod else None)

        self.players = {"generator": player(g_mod, cfg.lr_generator, cfg.ttur),
                        "guidance": player(f_mod, cfg.lr_fake, 1)}
        self.pairs: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._reference: Any = None  # the per-step diagnostics' real data (loaded on first use)
        self._samples: tuple[int, Batch, Tensor, list[int]] | None = None  # the generator loss's, for the guidance
        if cfg.regression:
            self.pairs = self._regression_pairs()

    def to(self, device: Any) -> "DMD2Method":
        self.teacher.to(device)
        if self.pairs is not None:
            self.pairs = tuple(None if p is None else p.to(device) for p in self.pairs)  # type: ignore[assignment]
        return self

    # --- schedule of updates ------------------------------------------------------------------------------------
    def updates(self, it: int) -> list[str]:
        # DMD2 code: COMPUTE_GENERATOR_GRADIENT = step % dfake_gen_update_ratio == 0; generator first, then guidance.
        return ["generator", "guidance"] if it % self.cfg.ttur == 0 else ["guidance"]

    # --- pieces -------------------------------------------------------------------------------------------------
    def _cond(self, batch: Batch) -> Any:
        return batch_cond(batch, self.teacher)

    def _t_dm(self, n: int, device: Any) -> Tensor:
        lo, hi = self.cfg.dm_t_range
        u = lo + (hi - lo) * torch.rand(n, device=device)
        t = self.schedule.from_fraction(u).to(device)
        return t.round() if self.schedule.kind == "ddpm" else t

    def _t_fake(self, n: int, device: Any) -> Tensor:
        """The fake score's denoising times (``fake_t_distribution``): the teacher's training draw, or a uniform index
        into :func:`karras_index_times` (the DMD2 EDM code)."""
        if self.fake_times is None:
            return self.schedule.sample_train_t(n, device=device)
        idx = torch.randint(0, len(self.fake_times), (n,), device=device)
        return self.fake_times.to(device)[idx]

    def _steps(self, n: int) -> list[int]:
        """The student step (0-based) each of ``n`` samples trains: per-step fake score, the batch split evenly over
        the steps (every step's fake score and head train every iteration); shared, one step for the whole batch
        (DMD2's random step index)."""
        if self.per_step:
            return split_steps(n, len(self.timesteps))
        return [int(torch.randint(0, len(self.timesteps), ()).item())] * n

    def _groups(self, steps: list[int]) -> list[tuple[int, slice]] | None:
        """The fake score's ``groups`` for samples of ``steps`` (None: the shared fake score)."""
        return step_groups(steps) if self.per_step else None

    def _generate(self, gen: nn.Module, n: int, cond: Any, device: Any) -> tuple[Tensor, list[int]]:
        """Generator samples with backward simulation (:func:`backward_simulation`; gradient only through each
        sample's last generator call) and the step of each."""
        z = torch.randn((n, *self.teacher.sample_shape), device=device)
        steps = self._steps(n)
        return backward_simulation(gen, self.schedule, z, self.timesteps.to(device), steps, cond), steps

    def _regression_pairs(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """DMD (v1)'s noise/image pairs: the teacher's deterministic ODE sample (Heun) from fixed noise."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.loop.seed + 12345)
        z = torch.randn((cfg.regression_pairs, *self.teacher.sample_shape), generator=gen)
        labels = None
        if self.teacher.num_classes > 0:
            labels = torch.randint(0, self.teacher.num_classes, (cfg.regression_pairs,), generator=gen)
        images = []
        for i in range(0, len(z), 256):
            cond = None if labels is None else labels[i : i + 256]
            # trailing spacing: the ODE starts at t = T-1, where the generator sees the same z
            images.append(teacher_sample(self.real, z[i : i + 256], cfg.regression_teacher_steps, "heun", cond=cond,
                                         spacing="trailing"))
        return z, torch.cat(images), labels

    # --- losses -------------------------------------------------------------------------------------------------
    def gan_on(self, it: int) -> bool:
        """Whether the GAN trains at iteration ``it`` (``gan`` and ``it >= gan_start_iteration``)."""
        return self.cfg.gan and it >= self.cfg.gan_start_iteration

    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, float]]:
        gan = self.gan_on(it)
        if player == "generator":
            return self._generator_loss(batch, gan, it)
        return self._guidance_loss(batch, gan, it)

    def _generator_loss(self, batch: Batch, gan: bool = True, it: int = -1) -> tuple[Tensor, dict[str, float]]:
        gen = self.players["generator"].module
        guidance = _unwrap(self.players["guidance"].module)  # not updated here: bypass DDP
        n, device = batch.x0.shape[0], batch.x0.device
        cond = self._cond(batch)
        x, steps = self._generate(gen, n, cond, device)
        self._samples = (it, batch, x.detach(), steps) if it >= 0 else None  # the guidance update's, this iteration
        groups = self._groups(steps)
        t = self._t_dm(n, device)
        x_t = self.schedule.add_noise(x, torch.randn_like(x), t)
        with torch.no_grad():
            real_x0 = self.real(x_t.detach(), t, cond)
            fake_x0 = guidance.score(x_t.detach(), t, cond, groups)  # step i's samples: fake_i
        grad = distribution_matching_grad(x.detach(), real_x0, fake_x0)
        loss = distribution_matching_loss(x, grad)
        stats = {"dm": loss.detach(), "score_mismatch": (real_x0 - fake_x0).pow(2).flatten(1).sum(1).mean()}
        if gan and self.cfg.gan and self.cfg.gan_generator_weight > 0:
            t_gan = self.schedule.sample_train_t(n, device=device)
            x_gan = self.schedule.add_noise(x, torch.randn_like(x), t_gan)
            g_loss = nonsaturating_g_loss(guidance.logits(x_gan, t_gan, cond, groups))
            loss = loss + self.cfg.gan_generator_weight * g_loss
            stats["gan_g"] = g_loss.detach()
        if self.pairs is not None:
            z, y, labels = self.pairs
            idx = torch.randint(0, len(z), (n,), device=z.device)
            zc = z[idx]
            c = None if labels is None else labels[idx]
            _, s0 = self.schedule.alpha_sigma(self.timesteps[:1])
            pred = gen(zc * s0.to(device), self.timesteps[0].to(device).expand(n), c)
            reg = F.mse_loss(pred, y[idx])
            loss = loss + self.cfg.regression_weight * reg
            stats["regression"] = reg.detach()
        return loss, stats

    def _guidance_loss(self, batch: Batch, gan: bool = True, it: int = -1) -> tuple[Tensor, dict[str, float]]:
        gen = self.players["generator"].module
        n, device = batch.x0.shape[0], batch.x0.device
        cond = self._cond(batch)
        reuse, self._samples = self._samples, None
        if reuse is not None and reuse[0] == it and reuse[1] is batch:  # the generator's samples of this iteration
            x, steps = reuse[2], reuse[3]
        else:
            with torch.no_grad():
                x, steps = self._generate(gen, n, cond, device)
        x = x.detach()
        t = self._t_fake(n, device)
        eps = torch.randn_like(x)
        gan_inputs = None
        if gan and self.cfg.gan:
            t_real = self.schedule.sample_train_t(n, device=device)
            t_fake = self.schedule.sample_train_t(n, device=device)
            x_real_t = self.schedule.add_noise(batch.x0, torch.randn_like(x), t_real)
            x_fake_t = self.schedule.add_noise(x, torch.randn_like(x), t_fake)
            gan_inputs = (x_real_t, cond, t_real, x_fake_t, t_fake)
        denoise, gan_d, real_logits, fake_logits = self.players["guidance"].module(x, cond, t, eps, gan_inputs,
                                                                                   self._groups(steps))
        loss, stats = denoise, {"denoise": denoise.detach()}
        if gan_d is not None:
            loss = loss + self.cfg.gan_head_weight * gan_d
            stats.update(gan_d=gan_d.detach(), real_logit=real_logits.detach().mean(),
                         fake_logit=fake_logits.detach().mean())
        if self.diagnostics_due(it):
            stats.update(self.step_diagnostics(batch, it))
        return loss, stats

    # --- per-step diagnostics -------------------------------------------------------------------------------------
    def diagnostics_due(self, it: int) -> bool:
        """A k-step run measures each step's output at every log row (iterations ``log_every``, ..., and the last)."""
        loop = self.cfg.loop
        return self.cfg.steps > 1 and it >= 0 and ((it + 1) % loop.log_every == 0 or it + 1 == loop.iterations)

    def _diagnostic_reference(self) -> Any:
        """``(kind, data)``: the test split for points (sliced W, modes), the train split for digits (FID on the
        digits classifier's features, the evaluation's reference), else ``("none", None)`` (the per-step score
        mismatch alone)."""
        if self._reference is None:
            self._reference = ("none", None)
            shape, name = tuple(self.teacher.sample_shape), self.cfg.data
            if name is not None and not getattr(self.teacher, "text_conditional", False):
                from ..data import load_data
                from ..eval.evaluate import DIGITS_SHAPES

                if len(shape) == 1 or (name == "digits" and shape in DIGITS_SHAPES):
                    try:
                        split = "test" if len(shape) == 1 else "train"
                        data = load_data(name, split, resolution=shape[-1] if len(shape) == 3 else None)
                    except Exception:  # a diagnostic never stops a run: without data, the mismatch alone
                        data = None
                    if data is not None and data.kind == "points":
                        self._reference = ("points", data)
                    elif data is not None:
                        from ..eval.classifier import load_digits_classifier
                        from ..eval.metrics import feature_stats

                        model = load_digits_classifier().eval()
                        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # float32 features
                            stats = feature_stats(model.features(data.x[:2000].float().clamp(-1, 1)))
                        self._reference = ("digits", (model, stats))
        return self._reference

    @torch.no_grad()
    def step_diagnostics(self, batch: Batch, it: int, n: int | None = None) -> dict[str, float]:
        """Each student step's output quality (issue 16: a shared fake score lets one step collapse while the mixture
        of all steps matches the data), from the inference sampler with draws of their own (seeded by the run's seed
        and ``it``: training's random streams are untouched, and every process measures the same samples).

        ``step<i>/score_mismatch``: ``E ||D_real - D_fake_i||^2`` on diffused step-i outputs (every teacher family);
        points: ``step<i>/sliced_w``, ``step<i>/modes_covered``; digits: ``step<i>/fid`` (the digits classifier's
        features against the test split); with ``pooled/<metric>`` (all steps' outputs together) and
        ``last_gap/<metric>`` = the last step's minus the pooled one (large: the last step, the one a user samples,
        is worse than the mixture the shared fake score matches).
        """
        kind, ref = self._diagnostic_reference()
        device = batch.x0.device
        g = torch.Generator().manual_seed(self.cfg.loop.seed * 1_000_003 + it)
        gen = _unwrap(self.players["generator"].module).denoiser  # as the student samples (FSDP: a unit of its own)
        guidance = _unwrap(self.players["guidance"].module)
        if kind == "none":  # the batch's conditions (prompts), its size
            n, cond = batch.x0.shape[0], self._cond(batch)
        else:
            n = n or (1000 if kind == "points" else 250)
            cond = None
            if self.teacher.num_classes > 0:
                cond = (torch.arange(n) % self.teacher.num_classes).to(device)
        z = torch.randn((n, *self.teacher.sample_shape), generator=g).to(device)
        ts = self.timesteps.to(device)
        final, inputs = sample_student(gen, z, ts, cond, generator=g, return_inputs=True)
        outs = [gen(inputs[i], ts[i].float().expand(n), cond) for i in range(len(ts) - 1)] + [final]
        out: dict[str, float] = {}
        lo, hi = self.cfg.dm_t_range
        for i, x in enumerate(outs):
            x = x.float()
            t = self.schedule.from_fraction(lo + (hi - lo) * torch.rand(n, generator=g)).to(device)
            t = t.round() if self.schedule.kind == "ddpm" else t
            x_t = self.schedule.add_noise(x, torch.randn(x.shape, generator=g).to(device), t)
            groups = [(i, slice(0, n))] if self.per_step else None
            diff = self.real(x_t, t, cond).float() - guidance.score(x_t, t, cond, groups).float()
            out[f"step{i + 1}/score_mismatch"] = float(diff.pow(2).flatten(1).sum(1).mean())
        if kind == "points":
            from ..eval.metrics import mode_metrics, sliced_wasserstein

            def measure(x: Tensor) -> dict[str, float]:
                m = {"sliced_w": sliced_wasserstein(x.float().cpu(), ref.x, n_projections=128)}
                if ref.modes is not None:
                    m["modes_covered"] = float(mode_metrics(x.float().cpu(), ref.modes, ref.mode_std)["modes_covered"])
                return m
        elif kind == "digits":
            from ..eval.metrics import feature_stats, frechet_distance

            model, stats = ref
            model.to(device)

            def measure(x: Tensor) -> dict[str, float]:
                with torch.autocast(device.type, enabled=False):  # float32 features, as the evaluation's
                    f = model.features(x.float().clamp(-1, 1)).float().cpu()
                return {"fid": frechet_distance(*feature_stats(f), *stats)}
        else:
            return out
        per_step = [measure(x) for x in outs]
        pooled = measure(torch.cat(outs))
        for i, m in enumerate(per_step):
            out.update({f"step{i + 1}/{k}": v for k, v in m.items()})
        out.update({f"pooled/{k}": v for k, v in pooled.items()})
        out.update({f"last_gap/{k}": per_step[-1][k] - v for k, v in pooled.items()})
        return out

    # --- outputs ------------------------------------------------------------------------------------------------
    def inference_model(self) -> Denoiser:
        player = self.players["generator"]
        module = player.ema if player.ema is not None else _unwrap(player.module)
        return module.denoiser
