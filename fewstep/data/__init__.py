"""Data: the embedded digits and 2-D toys, image folders and point files, behind one loader.

``load_data(spec)`` takes an embedded name (``EMBEDDED_DATA``), an image folder, or a ``.npy`` / ``.csv`` point file,
and returns a :class:`Dataset` held in memory: images ``(N, C, H, W)`` in ``[-1, 1]`` or points ``(N, D)`` in
normalised coordinates. Splits are fixed and reproducible; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .digits import digits_arrays
from .folder import IMAGE_SUFFIXES, load_image_folder
from .points import POINT_SUFFIXES, load_points
from .toys import TEST_SEED, TEST_SIZE, TOY_NAMES, TRAIN_SEED, TRAIN_SIZE, sample_toy, toy_modes

EMBEDDED_DATA = ("digits", "shapes", "ring8", "grid25", "moons", "checkerboard", "swissroll")
SPLITS = ("train", "test")

__all__ = ["EMBEDDED_DATA", "TOY_NAMES", "Dataset", "load_data", "sample_toy"]


@dataclass(eq=False)
class Dataset:
    """A data set held in memory.

    Attributes:
        name: the embedded name or the path given.
        kind: ``"image"`` or ``"points"``.
        x: float32; images ``(N, C, H, W)`` in ``[-1, 1]``, points ``(N, D)`` in normalised coordinates.
        labels: int64 ``(N,)`` or None.
        num_classes: 0 when unlabelled.
        class_names: one name per class.
        modes: ``(M, D)`` mixture centres (ring8, grid25), normalised coordinates.
        mode_std: std of each mixture component, normalised coordinates.
        shift, scale: points only, ``x_normalised = (x_raw - shift) / scale``; None = identity.
        captions: one caption per image (flat image folders with captions; the prompts of text-to-image
            teachers), or None.
    """

    name: str
    kind: str
    x: Tensor = field(repr=False)
    labels: Tensor | None = field(repr=False)
    num_classes: int
    class_names: list[str]
    modes: Tensor | None = field(default=None, repr=False)
    mode_std: float | None = None
    shift: Tensor | None = field(default=None, repr=False)
    scale: Tensor | None = field(default=None, repr=False)
    captions: list[str] | None = field(default=None, repr=False)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``(C, H, W)`` or ``(D,)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalised samples back to the user's raw coordinates (identity for images and embedded data).

        Args:
            x: samples ``(..., D)`` in normalised coordinates.
        """
        if self.scale is not None:
            x = x * self.scale.to(x.device, x.dtype)
        if self.shift is not None:
            x = x + self.shift.to(x.device, x.dtype)
        return x

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``batch_size`` examples drawn uniformly with replacement, and their labels (or None).

        Args:
            batch_size: number of examples.
            generator: the source of randomness (the caller seeds it).
        """
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=generator.device)
        idx = idx.to(self.x.device)
        return self.x[idx], None if self.labels is None else self.labels[idx]


def load_data(spec: str, split: str = "train", resolution: int | None = None, channels: int | None = None) -> Dataset:
    """Load a data set by embedded name or path.

    Args:
        spec: an embedded name (``EMBEDDED_DATA``), an image folder (flat, or one sub-folder per class), or a point
            file (``.npy`` holding an ``(N, D)`` array, or ``.csv`` with numeric columns and an optional header).
        split: ``"train"`` or ``"test"``; both are fixed and disjoint.
        resolution: image side (digits: 8 (default) or 16; image folders: default 32). Ignored for points.
        channels: 1 or 3 (default: the data's own; 1 when every image of a folder is grayscale). Ignored for
            points.
    """
    spec = str(spec)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, Integral) or resolution < 1):
        raise UserError(f"resolution must be a positive integer, not {resolution!r}; pass e.g. --resolution 32")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), not {channels!r}; pass --channels 1 or 3")

    if spec == "digits":
        x, y = digits_arrays(split, 8 if resolution is None else int(resolution))
        if channels == 3:
            x = x.repeat(1, 3, 1, 1)
        return Dataset(spec, "image", x, y, 10, [str(k) for k in range(10)])
    if spec == "shapes":
        from .shapes import NUM_CLASSES, RESOLUTION, class_names, shapes_arrays

        if resolution not in (None, RESOLUTION) or channels == 1:
            raise UserError(f"shapes are {RESOLUTION}x{RESOLUTION} RGB images; drop --resolution and --channels")
        x, y, caps = shapes_arrays(split)
        return Dataset(spec, "image", x, y, NUM_CLASSES, class_names(), captions=caps)
    if spec in TOY_NAMES:
        n, seed = (TRAIN_SIZE, TRAIN_SEED) if split == "train" else (TEST_SIZE, TEST_SEED)
        modes, mode_std = toy_modes(spec)
        return Dataset(spec, "points", sample_toy(spec, n, seed), None, 0, [], modes=modes, mode_std=mode_std)

    path = Path(spec).expanduser()
    if path.is_dir():
        images = load_image_folder(path, split, resolution, channels)
        names = images.class_names
        return Dataset(spec, "image", images.x, images.labels, len(names), names, captions=images.captions)
    if path.is_file() and path.suffix.lower() in POINT_SUFFIXES:
        x, shift, scale = load_points(path, split)
        return Dataset(spec, "points", x, None, 0, [], shift=shift, scale=scale)

    what = "no such file or folder" if not path.exists() else f"a {path.suffix or 'suffix-less'} file is not data"
    raise UserError(
        f"--data {spec!r}: {what}; use an embedded data set ({', '.join(EMBEDDED_DATA)}), a folder of images "
        f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}, optionally one sub-folder per class) or a point file (.npy or .csv)"
    )
