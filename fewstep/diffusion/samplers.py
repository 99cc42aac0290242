"""Samplers as plain functions over a denoiser, a noise tensor and a grid of times (k-diffusion's ``sampling.py``).

``ts`` is a grid from :meth:`Schedule.timesteps`: ``n`` times from noisiest to least noisy, then ``t_clean``.
A denoiser is anything with ``D(x_t, t, cond) -> x0_hat`` and a ``schedule`` attribute.

* DDIM (Song et al. 2021) -- first order; ``eta > 0`` adds DDIM's stochasticity. Deterministic DDIM *is* Euler's
  method on the probability-flow ODE in EDM's ``(x / alpha, sigma / alpha)`` coordinates (Karras et al. 2022, sec. 3),
  so ``euler`` differs from ``ddim`` only in its default grid (EDM's rho-spaced one).
* Heun -- EDM Algorithm 1's second-order correction, written for the ODE in data-prediction form
  ``dy/dr = D`` with ``y = x / sigma`` and ``r = alpha / sigma``; this form is well-defined at zero terminal SNR
  (``r = 0``), where the eps form divides by ``alpha = 0``. The last step to ``t_clean`` is an Euler step, as in EDM.
* The k-step student sampler (METHODS.md common notation): predict ``x0``, re-noise with fresh noise, repeat.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..options import SAMPLERS
from .schedule import Schedule, bcast

DEFAULT_SPACING = {"ddim": None, "euler": "karras", "heun": "karras"}


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of ``sampler`` with ``steps`` steps (without CFG's doubling)."""
    check_sampler(sampler)
    return 2 * steps - 1 if sampler == "heun" else steps


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def sampling_grid(schedule: Schedule, sampler: str, steps: int, spacing: str | None = None) -> Tensor:
    """The grid ``sampler`` uses for ``steps`` steps (its default spacing unless ``spacing`` is given)."""
    check_sampler(sampler)
    return schedule.timesteps(steps, spacing or DEFAULT_SPACING[sampler])


def initial_noise(schedule: Schedule, z: Tensor, t0: Tensor | float) -> Tensor:
    """The start of a sampling chain at ``t0`` from standard normal ``z``: ``sigma_{t0} z``.

    (For VP schedules this treats ``alpha_{t0} x0`` as negligible, as every sampler of the field does.)
    """
    _, s = schedule.alpha_sigma(torch.as_tensor(t0, dtype=torch.float32))
    return z * s.to(z.device, z.dtype)


def _ddim_update(schedule: Schedule, x: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """``x_next = alpha_next x0 + sigma_next eps_hat`` (DDIM, eta = 0)."""
    a, s = schedule.alpha_sigma(t)
    a_n, s_n = schedule.alpha_sigma(t_next)
    eps = (x - bcast(a, x) * x0) / bcast(s, x)
    return bcast(a_n, x) * x0 + bcast(s_n, x) * eps


def _data_form_update(schedule: Schedule, x: Tensor, d: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One step of ``y_next = y + (r_next - r) d`` with ``y = x / sigma``, ``r = alpha / sigma``."""
    a, s = schedule.alpha_sigma(t)
    a_n, s_n = schedule.alpha_sigma(t_next)
    a, s, a_n, s_n = (bcast(v, x) for v in (a, s, a_n, s_n))
    return (s_n / s) * x + (a_n - s_n * a / s) * d


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (a CPU generator gives the same
    numbers whatever device ``x`` is on)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.device).float().expand(x.shape[0])


@torch.no_grad()
def sample_ddim(
    denoiser: Any,
    x: Tensor,
    ts: Tensor,
    cond: Any = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """DDIM from ``x`` at ``ts[0]`` down to ``ts[-1]``; returns the final sample."""
    schedule = denoiser.schedule
    for i in range(len(ts) - 1):
        t, t_next = _per_sample(ts[i], x), _per_sample(ts[i + 1], x)
        x0 = denoiser(x, t, cond)
        if eta > 0 and float(ts[i + 1]) != schedule.t_clean:
            a, s = schedule.alpha_sigma(t)
            a_n, s_n = schedule.alpha_sigma(t_next)
            # Song et al. 2021, eq. 16: sigma_eta = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
            sig = eta * (s_n / s) * (1 - (a / a_n) ** 2).clamp(min=0).sqrt()
            eps = (x - bcast(a, x) * x0) / bcast(s, x)
            z = _randn_like(x, generator)
            dir_coef = (s_n**2 - sig**2).clamp(min=0).sqrt()
            x = bcast(a_n, x) * x0 + bcast(dir_coef, x) * eps + bcast(sig, x) * z
        else:
            x = _ddim_update(schedule, x, x0, t, t_next)
        if callback is not None:
            callback(i, x0)
    return x


@torch.no_grad()
def sample_euler(denoiser: Any, x: Tensor, ts: Tensor, cond: Any = None, **_: Any) -> Tensor:
    """Euler's method on the probability-flow ODE (equal to deterministic DDIM on the same grid)."""
    return sample_ddim(denoiser, x, ts, cond, eta=0.0)


@torch.no_grad()
def sample_heun(denoiser: Any, x: Tensor, ts: Tensor, cond: Any = None, **_: Any) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1) in data-prediction form; ``2n - 1`` evaluations."""
    schedule = denoiser.schedule
    for i in range(len(ts) - 1):
        t, t_next = _per_sample(ts[i], x), _per_sample(ts[i + 1], x)
        d = denoiser(x, t, cond)
        x_euler = _data_form_update(schedule, x, d, t, t_next)
        if float(ts[i + 1]) == schedule.t_clean:
            x = x_euler
            continue
        d_next = denoiser(x_euler, t_next, cond)
        x = _data_form_update(schedule, x, 0.5 * (d + d_next), t, t_next)
    return x


def sample(
    denoiser: Any,
    z: Tensor,
    steps: int,
    sampler: str = "ddim",
    cond: Any = None,
    spacing: str | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample a teacher: ``steps`` steps of ``sampler`` from standard normal ``z``."""
    ts = sampling_grid(denoiser.schedule, sampler, steps, spacing)
    x = initial_noise(denoiser.schedule, z, ts[0])
    fn = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun}[sampler]
    return fn(denoiser, x, ts, cond, eta=eta, generator=generator)


def student_timesteps(schedule: Schedule, steps: int) -> Tensor:
    """A k-step student's input times ``t_1 > ... > t_k`` (DDPM T=1000, k=4: 999, 749, 499, 249).

    Flow matching: the same trailing fractions ``1, (k-1)/k, ..., 1/k`` through the schedule's shift, which is the grid
    of diffusers' flow pipelines (Flux: ``sigmas = linspace(1, 1/k, k)``, shifted); the teacher's sampling grid ends
    near ``t_min`` instead and would put a 2-step student's second step at ``t ~ 0.01``."""
    if schedule.kind == "flow":
        return schedule.shift_t(torch.linspace(1.0, 1.0 / steps, steps)).float()
    spacing = "trailing" if schedule.kind == "ddpm" else None
    return schedule.timesteps(steps, spacing)[:-1]


def sample_student(
    generator_net: Any,
    z: Tensor,
    ts: Tensor,
    cond: Any = None,
    generator: torch.Generator | None = None,
    return_inputs: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """The k-step student sampler: ``x0_hat = G(x_{t_i}, t_i)``, re-noise with fresh noise to ``t_{i+1}``, repeat.

    With ``return_inputs`` it also returns the inputs ``x_{t_i}`` it visited (DMD2's backward simulation uses them).
    """
    schedule = generator_net.schedule
    x = initial_noise(schedule, z, ts[0])
    inputs = []
    x0 = x
    for i in range(len(ts)):
        inputs.append(x)
        x0 = generator_net(x, _per_sample(ts[i], x), cond)
        if i + 1 < len(ts):
            eps = _randn_like(x, generator)
            x = schedule.add_noise(x0, eps, _per_sample(ts[i + 1], x))
    return (x0, inputs) if return_inputs else x0


def sample_student_ode(generator_net: Any, z: Tensor, ts: Tensor, cond: Any = None, **_: Any) -> Tensor:
    """An ODE student's sampler (SDXL-Lightning's): ``x0_hat = G(x_{t_i}, t_i)``, then the deterministic DDIM step to
    ``t_{i+1}`` (the teacher's flow), the last step to clean returning ``x0_hat``; one evaluation a step."""
    schedule = generator_net.schedule
    grid = torch.cat([ts.detach().cpu().float(), torch.tensor([schedule.t_clean])]).to(z.device)
    return sample_ddim(generator_net, initial_noise(schedule, z, grid[0]), grid, cond)


#: the k-step student samplers by name (a saved student's ``meta.sampler``; "renoise" when it names none)
STUDENT_SAMPLERS: dict[str, Callable[..., Tensor]] = {"renoise": sample_student, "ode": sample_student_ode}
