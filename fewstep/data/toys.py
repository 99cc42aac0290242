"""2-D toy distributions, in normalised coordinates (overall scale about 1, as diffusion schedules assume).

``ring8`` and ``grid25`` are Gaussian mixtures with known centres, so mode coverage and sample quality can be measured
exactly; ``moons``, ``checkerboard`` and ``swissroll`` are the usual toys of the FFJORD / score-SDE papers.
Every draw is a pure function of ``(name, n, seed)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

TOY_NAMES = ("ring8", "grid25", "moons", "checkerboard", "swissroll")

# fixed splits: disjoint draws with different seeds
TRAIN_SIZE, TRAIN_SEED = 20_000, 0
TEST_SIZE, TEST_SEED = 5_000, 1

MIXTURE_STD = 0.05  # std of each ring8 / grid25 component
MOONS_NOISE = 0.05
# moons standardisation, exact for make_moons(noise=0.05) as n -> inf: outer arc (cos t, sin t), inner arc
# (1 - cos t, 1/2 - sin t), t ~ U[0, pi], half the points each -> mean (1/2, 1/4),
# var_x = 3/4 + noise^2, var_y = 9/16 - 1/pi + noise^2; overall std = sqrt((var_x + var_y) / 2)
MOONS_MEAN = (0.5, 0.25)
MOONS_STD = math.sqrt((0.75 + 0.5625 - 1.0 / math.pi + 2 * MOONS_NOISE**2) / 2)  # 0.70682
CHECKERBOARD_SCALE = 4.0  # FFJORD's checkerboard lies in [-4, 4]^2
SWISSROLL_NOISE = 0.5  # in make_swiss_roll's units
SWISSROLL_SCALE = 15.0  # (x, z) of make_swiss_roll(noise=0.5) lie in about [-11.5, 15.5]^2


def toy_modes(name: str) -> tuple[Tensor | None, float | None]:
    """The mixture centres ``(M, 2)`` and per-component std of ``ring8`` / ``grid25``; ``(None, None)`` otherwise.

    Args:
        name: a name from ``TOY_NAMES``.
    """
    _check_name(name)
    if name == "ring8":
        angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        return torch.stack([angle.cos(), angle.sin()], dim=1).float(), MIXTURE_STD
    if name == "grid25":
        axis = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).float(), MIXTURE_STD
    return None, None


def sample_toy(name: str, n: int, seed: int) -> Tensor:
    """``n`` fresh points ``(n, 2)`` float32 from a 2-D toy, in normalised coordinates; deterministic in ``seed``.

    The fixed train split is ``sample_toy(name, 20000, 0)``, the test split ``sample_toy(name, 5000, 1)``.

    Args:
        name: one of ``TOY_NAMES``.
        n: number of points (>= 1).
        seed: seed of the draw.
    """
    _check_name(name)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise UserError(f"cannot draw {n!r} points from {name!r}; ask for a positive integer number of points")
    n, seed = int(n), int(seed)
    rng = np.random.default_rng(seed)
    if name in ("ring8", "grid25"):
        modes, std = toy_modes(name)
        k = rng.integers(0, len(modes), size=n)  # equal weights
        x = modes.numpy().astype(np.float64)[k] + std * rng.standard_normal((n, 2))
    elif name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n_samples=n, noise=MOONS_NOISE, random_state=seed)
        x = (x - np.asarray(MOONS_MEAN)) / MOONS_STD
    elif name == "checkerboard":
        # FFJORD (Grathwohl et al. 2019) toy_data.py: 8 unit squares of a 4x4 board, scaled by 2
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1) * 2 / CHECKERBOARD_SCALE
    else:  # swissroll
        from sklearn.datasets import make_swiss_roll

        x, _ = make_swiss_roll(n_samples=n, noise=SWISSROLL_NOISE, random_state=seed)
        x = x[:, [0, 2]] / SWISSROLL_SCALE
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _check_name(name: str) -> None:
    if name not in TOY_NAMES:
        raise UserError(f"unknown 2-D toy {name!r}; use one of {', '.join(TOY_NAMES)}")
