"""scikit-learn's handwritten digits (8x8, 1,797 images, 10 classes): ships inside scikit-learn, no download."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

DIGITS_RESOLUTIONS = (8, 16)


def digits_arrays(split: str, resolution: int = 8) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, R, R)`` in ``[-1, 1]`` and labels ``(N,)`` of the fixed split ``"train"`` or ``"test"``.

    The split is fixed: 20 % held out, stratified by class, ``random_state=0`` (1,437 train / 360 test images).
    16x16 images are bilinear upsamplings of the 8x8 originals.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    if resolution not in DIGITS_RESOLUTIONS:
        raise UserError(f"digits come at resolution 8 or 16, not {resolution}; pass --resolution 8 or 16")
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.2, random_state=0, stratify=bunch.target
    )
    idx = idx_train if split == "train" else idx_test
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    y = torch.from_numpy(bunch.target[idx].astype(np.int64))
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.contiguous(), y
