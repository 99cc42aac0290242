"""Noise schedules: one object that gives ``alpha_t`` and ``sigma_t`` for every family we support.

The forward process is always ``x_t = alpha_t * x0 + sigma_t * eps`` (METHODS.md, common notation). Time ``t`` is kept
in each family's *native* unit, the one its networks are trained with:

* :class:`DDPMSchedule` -- discrete DDPM, ``t`` a (possibly fractional) timestep in ``[0, T-1]``;
* :class:`EDMSchedule` -- EDM's continuous VE process, ``t = sigma`` and ``alpha = 1``;
* :class:`FlowSchedule` -- flow matching / rectified flow, ``x_t = (1 - t) x0 + t eps`` with ``t`` in ``[0, 1]``.

Every schedule also has a *clean* time ``t_clean`` (``alpha = 1, sigma = 0``); a sampler's last step goes there and no
network is ever evaluated at it. Conversions between eps-, v-, x0- (``"sample"``), flow-velocity- and EDM's
F-prediction live on the base class, so samplers and losses never branch on the family.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow", "edm"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(B,)`` (or a scalar) so it broadcasts against ``x`` of shape ``(B, ...)``."""
    v = torch.as_tensor(v, device=x.device, dtype=x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


class Schedule(ABC):
    """Base class: ``alpha_sigma(t)`` plus the conversions every method and sampler uses."""

    kind: str

    # --- what each family defines -------------------------------------------------------------------------------
    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` for native times ``t`` (any shape, float)."""

    @property
    @abstractmethod
    def t_max(self) -> float:
        """The noisiest time a network is trained at (a one-step generator's input time)."""

    @property
    @abstractmethod
    def t_min(self) -> float:
        """The least noisy time a network is trained at."""

    @property
    @abstractmethod
    def t_clean(self) -> float:
        """A time with ``alpha = 1, sigma = 0``: only ever the target of a sampler step."""

    @abstractmethod
    def c_noise(self, t: Tensor) -> Tensor:
        """The time input the network sees (DDPM: the timestep; flow: ``1000 t``; EDM: ``ln(sigma) / 4``)."""

    def c_in(self, t: Tensor) -> Tensor:
        """Input scaling applied to ``x_t`` before the network (EDM's ``c_in``; 1 elsewhere)."""
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float32))

    @abstractmethod
    def from_fraction(self, u: Tensor) -> Tensor:
        """Map ``u`` in ``[0, 1]`` (0 = ``t_min``, 1 = ``t_max``) to native time, monotonically."""

    @abstractmethod
    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training times drawn from the family's standard distribution."""

    @abstractmethod
    def timesteps(self, n: int, spacing: str | None = None) -> Tensor:
        """A sampling grid: ``n`` times from noisiest to least noisy, then ``t_clean`` (length ``n + 1``)."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict that :func:`schedule_from_config` turns back into an equal schedule."""

    # --- shared mathematics -------------------------------------------------------------------------------------
    def sigma_tilde(self, t: Tensor) -> Tensor:
        """``sigma_t / alpha_t``: the VE-equivalent noise level (Karras et al. 2022, eq. 4); ``inf`` at zero SNR."""
        a, s = self.alpha_sigma(t)
        return s / a

    def snr(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return a**2 / s**2

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t eps``."""
        a, s = self.alpha_sigma(t)
        return bcast(a, x0) * x0 + bcast(s, x0) * eps

    def _edm_coefficients(self, t: Tensor, x: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
        _, s = self.alpha_sigma(t)
        s = bcast(s, x)
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
        return c_skip, c_out

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Turn a network's raw prediction into the denoised estimate ``x0_hat``."""
        a, s = self.alpha_sigma(t)
        a, s = bcast(a, x_t), bcast(s, x_t)
        if prediction_type == "sample":
            return pred
        if prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if prediction_type == "v_prediction":  # v = alpha eps - sigma x0 (alpha^2 + sigma^2 = 1 on VP schedules)
            return (a * x_t - s * pred) / (a**2 + s**2)
        if prediction_type == "flow":  # u = eps - x0 (rectified flow velocity)
            return (x_t - s * pred) / (a + s)
        if prediction_type == "edm":  # EDM eq. 7: D = c_skip x + c_out F
            c_skip, c_out = self._edm_coefficients(t, x_t, getattr(self, "sigma_data", 0.5))
            return c_skip * x_t + c_out * pred
        raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The regression target of a network of this prediction type for ``x_t = add_noise(x0, eps, t)``."""
        a, s = self.alpha_sigma(t)
        a, s = bcast(a, x0), bcast(s, x0)
        if prediction_type == "sample":
            return x0
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return a * eps - s * x0
        if prediction_type == "flow":
            return eps - x0
        if prediction_type == "edm":
            x_t = a * x0 + s * eps
            c_skip, c_out = self._edm_coefficients(t, x_t, getattr(self, "sigma_data", 0.5))
            return (x0 - c_skip * x_t) / c_out
        raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return (x_t - bcast(a, x_t) * x0) / bcast(s, x_t)

    def score(self, x0_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x_t) = -(x_t - alpha_t x0_hat) / sigma_t^2`` (METHODS.md, common notation)."""
        a, s = self.alpha_sigma(t)
        return -(x_t - bcast(a, x_t) * x0_hat) / bcast(s, x_t) ** 2

    def karras(self, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
        """EDM's time discretisation (Karras et al. 2022, eq. 5) in ``sigma_tilde``, as native times."""
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        st = (hi + ramp * (lo - hi)) ** rho
        return self.t_from_sigma_tilde(st)

    def t_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_config() == other.to_config()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------------------------------------------
# DDPM, discrete time
# ------------------------------------------------------------------------------------------------------------------
def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021, as diffusers' ``squaredcos_cap_v2``."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_betas_zero_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Algorithm 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["trailing", "leading", "linspace", "karras"]


class DDPMSchedule(Schedule):
    """Discrete DDPM time (Ho et al. 2020) with diffusers' beta schedules, spacings and zero-terminal-SNR rescale.

    Args:
        num_train_timesteps: T.
        beta_schedule: ``linear``, ``scaled_linear`` (Stable Diffusion) or ``squaredcos_cap_v2`` (cosine).
        beta_start, beta_end: the end points of the linear schedules.
        rescale_zero_terminal_snr: rescale so that ``alpha_{T-1} = 0`` (pure noise at the last step).
        timestep_spacing: the default spacing of :meth:`timesteps`.
        steps_offset: added to ``leading`` timesteps, as in diffusers (SD uses 1).

    Fractional times are allowed: ``sigma_tilde`` is interpolated log-linearly between the integer steps
    (k-diffusion's ``DiscreteSchedule.t_to_sigma``), so continuous samplers can visit any noise level.
    """

    kind = "ddpm"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rescale_zero_terminal_snr: bool = False,
        timestep_spacing: Spacing = "trailing",
        steps_offset: int = 0,
    ) -> None:
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        T = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(T)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use linear, scaled_linear or squaredcos_cap_v2")
        if rescale_zero_terminal_snr:
            betas = rescale_betas_zero_snr(betas)
        if timestep_spacing not in ("trailing", "leading", "linspace", "karras"):
            raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; use trailing, leading, linspace or karras")
        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.rescale_zero_snr = rescale_zero_terminal_snr
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float32, exactly as diffusers
        ac = self.alphas_cumprod.double()
        self._log_sigma_tilde = 0.5 * (torch.log1p(-ac) - torch.log(ac))  # +inf at zero terminal SNR

    # time grid ------------------------------------------------------------------------------------------------
    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_clean(self) -> float:
        return -1.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        tf = t.double().clamp(max=self.t_max)
        table = self._log_sigma_tilde.to(tf.device)
        lo = tf.floor().clamp(min=0).long()
        hi = tf.ceil().clamp(min=0).long()
        w = (tf - lo.double()).clamp(0, 1)
        log_lo, log_hi = table[lo], table[hi]
        interp = torch.where(w == 0, log_lo, torch.where(w == 1, log_hi, (1 - w) * log_lo + w * log_hi))
        sigma_tilde = interp.exp()
        is_int = w == 0
        ac = self.alphas_cumprod.to(tf.device).double()[lo]
        # Integer times read alphas_cumprod directly (bit-compatible with diffusers); fractional ones interpolate.
        alpha = torch.where(is_int, ac.sqrt(), 1 / (1 + sigma_tilde**2).sqrt())
        sigma = torch.where(is_int, (1 - ac).sqrt(), 1 / (1 + sigma_tilde.pow(-2)).sqrt())
        clean = tf < 0
        alpha = torch.where(clean, torch.ones_like(alpha), alpha)
        sigma = torch.where(clean, torch.zeros_like(sigma), sigma)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        return alpha.to(dtype), sigma.to(dtype)

    def t_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """Invert the log-linear interpolation of :meth:`alpha_sigma` (k-diffusion's ``sigma_to_t``)."""
        log_s = torch.as_tensor(sigma_tilde, dtype=torch.float64).log()
        table = self._log_sigma_tilde
        finite = table[torch.isfinite(table)]
        log_s = log_s.clamp(finite[0], finite[-1])
        idx = torch.searchsorted(finite, log_s).clamp(1, len(finite) - 1)
        lo, hi = finite[idx - 1], finite[idx]
        w = (log_s - lo) / (hi - lo)
        return (idx - 1).double() + w

    def c_noise(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32)

    def from_fraction(self, u: Tensor) -> Tensor:
        return torch.as_tensor(u, dtype=torch.float32) * self.t_max

    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=device).float()

    def timesteps(self, n: int, spacing: str | None = None) -> Tensor:
        """The sampling grid of diffusers' DDIM/DDPM ``set_timesteps`` for ``spacing``, then ``t_clean``.

        ``karras`` spaces ``sigma_tilde`` as EDM does (rho = 7) between the smallest and largest finite noise levels,
        capped at EDM's ``sigma_max = 80``: past that a VP sample is pure noise to float precision.
        """
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        spacing = spacing or self.timestep_spacing
        T = self.num_train_timesteps
        if n > T:
            raise ValueError(f"cannot take {n} steps on a {T}-step schedule")
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy()
        elif spacing == "leading":
            ratio = T // n
            ts = (np.arange(0, n) * ratio).round()[::-1].copy() + self.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        elif spacing == "karras":
            finite = self._log_sigma_tilde[torch.isfinite(self._log_sigma_tilde)].exp()
            s_max = min(float(finite[-1]), 80.0)
            ts_t = self.karras(n, float(finite[0]), s_max)
            return torch.cat([ts_t.float(), torch.tensor([self.t_clean])])
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; use trailing, leading, linspace or karras")
        return torch.cat([torch.from_numpy(ts.astype(np.float32)), torch.tensor([self.t_clean])])

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "rescale_zero_terminal_snr": self.rescale_zero_snr,
            "timestep_spacing": self.timestep_spacing,
            "steps_offset": self.steps_offset,
        }


# ------------------------------------------------------------------------------------------------------------------
# EDM, continuous sigma
# ------------------------------------------------------------------------------------------------------------------
class EDMSchedule(Schedule):
    """Karras et al. 2022 (EDM): ``alpha = 1``, ``sigma = t``; log-normal training sigmas; rho-spaced sampling grid."""

    kind = "edm"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.rho, self.p_mean, self.p_std = rho, p_mean, p_std

    @property
    def t_max(self) -> float:
        return self.sigma_max

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_clean(self) -> float:
        return 0.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32) if not torch.is_tensor(t) else t.float()
        return torch.ones_like(t), t

    def t_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        return torch.as_tensor(sigma_tilde, dtype=torch.float64)

    def c_in(self, t: Tensor) -> Tensor:
        return 1 / (torch.as_tensor(t, dtype=torch.float32) ** 2 + self.sigma_data**2).sqrt()

    def c_noise(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32).log() / 4

    def from_fraction(self, u: Tensor) -> Tensor:
        u = torch.as_tensor(u, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return ((lo + u * (hi - lo)) ** self.rho).float()

    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        z = torch.randn(n, generator=generator, device=device)
        return (z * self.p_std + self.p_mean).exp()

    def timesteps(self, n: int, spacing: str | None = None) -> Tensor:
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        if n == 1:
            ts = torch.tensor([self.sigma_max], dtype=torch.float64)
        else:
            ts = self.karras(n, self.sigma_min, self.sigma_max, self.rho)
        return torch.cat([ts.float(), torch.tensor([self.t_clean])])

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "rho": self.rho,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
        }


# ------------------------------------------------------------------------------------------------------------------
# Flow matching / rectified flow
# ------------------------------------------------------------------------------------------------------------------
class FlowSchedule(Schedule):
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` (SD3, Flux) with the SD3 timestep shift
    ``t' = shift t / (1 + (shift - 1) t)``, discretised as diffusers' ``FlowMatchEulerDiscreteScheduler``."""

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift

    def shift_t(self, t: Tensor) -> Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def t_min(self) -> float:
        return float(self.shift_t(torch.tensor(1.0 / self.num_train_timesteps)))

    @property
    def t_clean(self) -> float:
        return 0.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32) if not torch.is_tensor(t) else t.float()
        return 1 - t, t

    def t_from_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        st = torch.as_tensor(sigma_tilde, dtype=torch.float64)
        return st / (1 + st)

    def c_noise(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float32) * self.num_train_timesteps

    def from_fraction(self, u: Tensor) -> Tensor:
        u = torch.as_tensor(u, dtype=torch.float32)
        return self.shift_t(self.t_min_unshifted + u * (1 - self.t_min_unshifted))

    @property
    def t_min_unshifted(self) -> float:
        return 1.0 / self.num_train_timesteps

    def sample_train_t(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        # SD3's logit-normal draw (Esser et al. 2024, eq. 19, m = 0, s = 1), then the timestep shift.
        u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        return self.shift_t(u)

    def timesteps(self, n: int, spacing: str | None = None) -> Tensor:
        if n < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {n}")
        # diffusers: linspace between the (already shifted) sigma_max and sigma_min, then shifted once more.
        u = np.linspace(1.0, self.t_min, n).astype(np.float32)
        ts = self.shift_t(torch.from_numpy(u))
        return torch.cat([ts.float(), torch.tensor([self.t_clean])])

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Build a schedule from :meth:`Schedule.to_config` output."""
    config = dict(config)
    kind = config.pop("kind", None)
    classes = {"ddpm": DDPMSchedule, "edm": EDMSchedule, "flow": FlowSchedule}
    if kind not in classes:
        raise ValueError(f"unknown schedule kind {kind!r}; use one of {sorted(classes)}")
    return classes[kind](**config)
