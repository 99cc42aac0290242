"""Inception FID for teachers of real images, through torchmetrics' ``FrechetInceptionDistance``, and patch FID.

Patch FID is SDXL-Lightning's measure of high-resolution detail (Lin et al. 2024, sec. 5): Inception FID on the
299x299 centre crop of each *full-resolution* image, so the network sees pixels at their native scale instead of a
whole 1024px image resized down to 299 (where fine detail is averaged away).

The Inception-v3 weights are never downloaded: give the file ``pt_inception-2015-12-05-6726825d.pth`` (the
pytorch-fid release, the same 2015-12-05 TF-Inception weights torch-fidelity uses) by argument, by the environment
variable ``FEWSTEP_INCEPTION_WEIGHTS``, or at ``~/.cache/fewstep/``. Needs the ``inception`` extra (torchmetrics,
torch-fidelity).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "FEWSTEP_INCEPTION_WEIGHTS"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE


def default_weights_path() -> Path:
    """``~/.cache/fewstep/pt_inception-2015-12-05-6726825d.pth``."""
    return Path.home() / ".cache" / "fewstep" / WEIGHTS_FILE


def locate(value: str | os.PathLike | None, argument: str, env: str, default: Path) -> tuple[Path, str]:
    """Where a local weights file or folder is looked for, and where that came from (for the error message):
    ``value`` (the argument named ``argument``), else ``$env``, else ``default``."""
    if value is not None:
        return Path(value).expanduser(), f"the {argument} argument"
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser(), f"${env}"
    return default, "the default location"


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: the argument, else ``$FEWSTEP_INCEPTION_WEIGHTS``, else the cache path.

    Raises ``UserError`` naming the file to provide when it does not exist.
    """
    path, origin = locate(weights_path, "weights_path", WEIGHTS_ENV, default_weights_path())
    if not path.is_file():
        raise UserError(
            f"Inception weights not found at {path} ({origin}); download {WEIGHTS_FILE} (the pytorch-fid / "
            f"torch-fidelity release file, {WEIGHTS_URL}) and put it there, set {WEIGHTS_ENV}=FILE or pass weights_path"
        )
    return path


def _to_uint8_rgb(x: Tensor | np.ndarray) -> Tensor:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` with C in {1, 3} -> uint8 RGB ``(N, 3, H, W)`` in ``[0, 255]``."""
    x = torch.as_tensor(x).detach().cpu().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"Inception FID takes images (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def inception_fid(
    real: Tensor | np.ndarray,
    fake: Tensor | np.ndarray,
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID (Heusel et al. 2017) between two image sets on Inception-v3 pool3 features (2048-d).

    Images of any size are resized to 299x299 by torchmetrics; one channel is repeated to RGB.

    Args:
        real: reference images ``(N, 1 or 3, H, W)`` in ``[-1, 1]``.
        fake: generated images, same layout.
        weights_path: the Inception weights file (see the module docstring for the fallbacks).
        batch_size: images per forward pass.
        feature_extractor: use this module instead of Inception: it maps uint8 RGB images ``(B, 3, H, W)`` to
            features ``(B, D)``; no weights file is needed (tests, domain networks).
        device: where the feature network runs.
    """
    real_u8, fake_u8 = _to_uint8_rgb(real), _to_uint8_rgb(fake)
    if min(len(real_u8), len(fake_u8)) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(real_u8)} real and {len(fake_u8)} fake")
    # the weights file is checked before anything else: torch-fidelity downloads when given no path
    path = resolve_weights_path(weights_path) if feature_extractor is None else None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:
        raise UserError(f"Inception FID needs torchmetrics ({e}); pip install 'fewstep[inception]'") from None
    if feature_extractor is not None:
        metric = FrechetInceptionDistance(feature=feature_extractor, input_img_size=tuple(real_u8.shape[1:]))
    else:
        if not _TORCH_FIDELITY_AVAILABLE:
            raise UserError("Inception FID needs torch-fidelity; pip install 'fewstep[inception]' "
                            "(or pass feature_extractor=)")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    metric = metric.to(device)
    for images, is_real in ((real_u8, True), (fake_u8, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size].to(device), real=is_real)
    return float(metric.compute())


PATCH_SIZE = 299


def center_crop(x: Tensor | np.ndarray, size: int) -> Tensor:
    """The ``size`` x ``size`` centre crop of images ``(N, C, H, W)`` (no resizing)."""
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise UserError(f"patch FID takes images (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise UserError(f"patch FID crops {size}x{size} patches from full-resolution images, but these are {h}x{w}; "
                        f"use Inception FID for small images or pass a smaller patch size")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def patch_fid(
    real: Tensor | np.ndarray,
    fake: Tensor | np.ndarray,
    patch: int = PATCH_SIZE,
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """FID on centre crops of full-resolution images (SDXL-Lightning's "FID-Patch").

    Args:
        real: reference images ``(N, 1 or 3, H, W)`` in ``[-1, 1]`` at full resolution (e.g. 1024x1024).
        fake: generated images, same layout and resolution.
        patch: crop side (299: Inception's input size, so crops are not resized).
        weights_path, batch_size, feature_extractor, device: as :func:`inception_fid`.
    """
    return inception_fid(center_crop(real, patch), center_crop(fake, patch), weights_path=weights_path,
                         batch_size=batch_size, feature_extractor=feature_extractor, device=device)
