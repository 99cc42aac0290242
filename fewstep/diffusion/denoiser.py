"""The one interface every network is used through: a denoiser ``D(x_t, t, cond) -> x0_hat``.

A *network* (our UNet, our MLP, a diffusers model behind an adapter) obeys a small protocol:

* ``net(x, c_noise, cond) -> raw prediction`` in its own parameterisation (eps, v, x0, flow velocity or EDM's F);
* ``net.features(x, c_noise, cond) -> Tensor``: the encoder + mid block output (DMD2's GAN head and Lightning's
  discriminator sit on it);
* ``net.null_cond(cond) -> cond``: the unconditional counterpart of ``cond`` (the null class, the empty prompt).

:class:`Denoiser` wraps such a network with its schedule and prediction type, so samplers and distillation methods only
ever see ``x0_hat`` (EDM's ``EDMPrecond`` and k-diffusion's ``DiscreteEpsDDPMDenoiser`` are the models for this).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .schedule import PREDICTION_TYPES, Schedule, bcast


def _expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


class Denoiser(nn.Module):
    """``D(x_t, t, cond) -> x0_hat`` over ``schedule``.

    Args:
        net: a network obeying the protocol in this module's docstring.
        schedule: the noise schedule the network was trained with.
        prediction_type: what ``net`` predicts: ``epsilon``, ``v_prediction``, ``sample``, ``flow`` or ``edm``.
        sample_shape: the shape of one sample, e.g. ``(1, 8, 8)`` or ``(2,)``.
        num_classes: number of classes for class-conditional networks (0 when unconditional or text-conditional).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        sample_shape: tuple[int, ...],
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {PREDICTION_TYPES}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes

    def raw(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The network's own prediction (eps, v, ...) at ``(x_t, t)``."""
        t = _expand_t(t, x_t)
        c_in = bcast(self.schedule.c_in(t).to(x_t.device), x_t)
        return self.net(c_in * x_t, self.schedule.c_noise(t).to(x_t.device), cond)

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        t = _expand_t(t, x_t)
        return self.schedule.to_x0(self.raw(x_t, t, cond), x_t, t, self.prediction_type)

    def features(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        """The network's encoder + mid block output at ``(x_t, t)``."""
        t = _expand_t(t, x_t)
        c_in = bcast(self.schedule.c_in(t).to(x_t.device), x_t)
        return self.net.features(c_in * x_t, self.schedule.c_noise(t).to(x_t.device), cond)

    def null_cond(self, cond: Any) -> Any:
        """The unconditional counterpart of ``cond`` (the null class for our networks)."""
        if cond is None:
            return None
        return self.net.null_cond(cond)

    def denoising_loss(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Any = None) -> Tensor:
        """Per-sample denoising loss in the network's own parameterisation (eps-, v-, flow- or F-MSE).

        Those are x0-MSE with the family's standard weights: SNR for eps, SNR + 1 for v (and flow), and
        EDM's ``lambda(sigma) c_out^2 = 1`` for F (Karras et al. 2022, Table 1).
        """
        t = _expand_t(t, x0)
        x_t = self.schedule.add_noise(x0, eps, t)
        target = self.schedule.target(x0, eps, t, self.prediction_type)
        err = (self.raw(x_t, t, cond).float() - target.float()) ** 2
        return err.flatten(1).mean(1)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance on a denoiser: ``D_w = D(x, t, null) + w (D(x, t, c) - D(x, t, null))``.

    ``w = 1`` is no guidance (METHODS.md convention (b)); the two branches run as one batch.
    """

    def __init__(self, denoiser: Denoiser, scale: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape

    @property
    def num_classes(self) -> int:
        return self.denoiser.num_classes

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        if cond is None or self.scale == 1.0:
            return self.denoiser(x_t, t, cond)
        t = _expand_t(t, x_t)
        null = self.denoiser.null_cond(cond)
        both = _cat_cond(cond, null)
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        cond_out, uncond_out = out.chunk(2)
        return uncond_out + self.scale * (cond_out - uncond_out)

    def features(self, x_t: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        return self.denoiser.features(x_t, t, cond)

    def null_cond(self, cond: Any) -> Any:
        return self.denoiser.null_cond(cond)


def _cat_cond(a: Any, b: Any) -> Any:
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditions of type {type(a).__name__}")


def guided(denoiser: Denoiser, scale: float) -> nn.Module:
    """``denoiser`` with CFG at ``scale`` (itself when ``scale == 1``)."""
    return denoiser if scale == 1.0 else CFGDenoiser(denoiser, scale)
