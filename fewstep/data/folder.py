"""Image folders: flat (unlabelled) or one sub-folder per class, like torchvision's ``ImageFolder``.

A flat folder may carry captions, one per image (the training prompts of text-to-image teachers), in any one of:

* ``img.txt`` next to ``img.png`` (the caption is the file's text, stripped);
* ``metadata.jsonl`` with lines ``{"file_name": "img.png", "text": "..."}`` (``caption`` works too), as the Hugging
  Face ``imagefolder`` loader reads;
* ``captions.txt`` with lines ``img.png<TAB>caption``.

Each image is resized so its shorter side is ``resolution`` (PIL bicubic), centre-cropped to a square (as diffusers'
training scripts do) and scaled to ``[-1, 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .points import fixed_split_indices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DEFAULT_RESOLUTION = 32
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass
class FolderImages:
    """Decoded images ``x`` ``(N, C, R, R)`` in ``[-1, 1]``, labels ``(N,)`` or None, the class names, and one caption
    per image (or None)."""

    x: Tensor
    labels: Tensor | None
    class_names: list[str]
    captions: list[str] | None = None


def read_captions(folder: str | Path, files: list[Path]) -> list[str] | None:
    """One caption per file of a flat folder (see the module docstring), or None when the folder has no captions."""
    import json

    folder = Path(folder)
    table: dict[str, str] = {}
    meta, listing = folder / "metadata.jsonl", folder / "captions.txt"
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[str(row["file_name"])] = str(row.get("text", row.get("caption")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta}:{n}: expected {{\"file_name\": ..., \"text\": ...}}; fix the line") from None
    elif listing.is_file():
        for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            name, sep, text = line.partition("\t")
            if not sep:
                raise UserError(f"{listing}:{n}: expected 'file name<TAB>caption'; fix the line")
            table[name.strip()] = text.strip()
    sidecars = {f: f.with_suffix(".txt") for f in files}
    if not table and not any(p.is_file() for p in sidecars.values()):
        return None
    captions = []
    for f in files:
        rel = f.relative_to(folder).as_posix()
        if rel in table:
            captions.append(table[rel])
        elif sidecars[f].is_file():
            captions.append(sidecars[f].read_text(encoding="utf-8").strip())
        else:
            raise UserError(f"{f} has no caption; add {sidecars[f].name} next to it (or a line for it in "
                            f"{meta.name if meta.is_file() else listing.name}), or remove the image")
    return captions


def list_images(folder: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """The sorted image files of ``folder``, their class index (None for a flat folder) and the class names.

    Immediate sub-folders that hold images (at any depth) are classes, labelled by sorted name; otherwise the images
    directly in ``folder`` form an unlabelled set. Hidden files and folders are skipped.

    Args:
        folder: the image folder.
    """
    folder = Path(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d.name, files) for d in subdirs if (files := _images_in(d, recursive=True))]
    loose = _images_in(folder, recursive=False)
    if classes:
        if loose:
            raise UserError(
                f"{folder}: holds both class sub-folders and loose images (e.g. {loose[0].name}); "
                "move the loose images into a class sub-folder, or use a flat folder without sub-folders"
            )
        files = [f for _, fs in classes for f in fs]
        labels = [k for k, (_, fs) in enumerate(classes) for _ in fs]
        return files, labels, [name for name, _ in classes]
    if not loose:
        raise UserError(
            f"{folder}: no images found (accepted suffixes: {', '.join(s[1:] for s in IMAGE_SUFFIXES)}); "
            "put the images in the folder, or one sub-folder per class"
        )
    return loose, None, []


def load_image_folder(
    folder: str | Path, split: str, resolution: int | None = None, channels: int | None = None
) -> FolderImages:
    """The fixed ``split`` of an image folder, decoded.

    Args:
        folder: the image folder (flat, or one sub-folder per class).
        split: ``"train"`` or ``"test"`` (fixed permutation with seed 0 of the sorted files; the last 10 %, at least
            one image, are the test split).
        resolution: side of the square images (default 32).
        channels: 1 (grayscale) or 3 (RGB); default 1 when every image is grayscale, else 3.
    """
    folder = Path(folder)
    resolution = DEFAULT_RESOLUTION if resolution is None else int(resolution)
    files, labels, class_names = list_images(folder)
    if len(files) < 2:
        raise UserError(f"{folder}: holds only {len(files)} image; add images (the test split needs at least one)")
    # header-only opens: catch undecodable files and pick the channel count from every image, whatever the split
    gray = True
    for f in files:
        with _open(f) as im:
            gray = gray and _is_gray(im)
    if channels is None:
        channels = 1 if gray else 3
    idx = fixed_split_indices(len(files), split)
    xt = _read_images(files, idx, resolution, channels)
    y = None if labels is None else torch.tensor([labels[j] for j in idx], dtype=torch.int64)
    captions = read_captions(folder, files) if labels is None else None
    return FolderImages(xt, y, class_names, None if captions is None else [captions[j] for j in idx])


def _read_images(files: list[Path], idx: "np.ndarray | list[int]", resolution: int, channels: int) -> torch.Tensor:
    """``files[j]`` for ``j`` in ``idx`` as ``(n, channels, resolution, resolution)`` in ``[-1, 1]``; an undecodable
    file is a one-line error naming it."""
    from PIL import Image

    x = np.empty((len(idx), resolution, resolution, channels), dtype=np.uint8)
    for i, j in enumerate(idx):
        try:
            with _open(files[j]) as im:
                x[i] = _to_array(im, resolution, channels).reshape(resolution, resolution, channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _corrupt(files[j], e) from None
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def iter_image_folder(folder: str | Path, split: str, resolution: int, channels: int, chunk: int = 64):
    """The fixed ``split`` of an image folder in chunks of ``chunk`` images, never all of it in memory: yields
    ``(x, labels)`` with ``x`` ``(n, channels, resolution, resolution)`` in ``[-1, 1]`` and labels ``(n,)`` or None.
    The order is :func:`load_image_folder`'s."""
    files, labels, _ = list_images(folder)
    if len(files) < 2:
        raise UserError(f"{folder}: holds only {len(files)} image; add images (the test split needs at least one)")
    idx = fixed_split_indices(len(files), split)
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        yield _read_images(files, part, resolution, channels), None if labels is None else torch.tensor([labels[j] for j in part], dtype=torch.int64)


def folder_split_files(folder: str | Path, split: str) -> tuple[list[Path], list[str] | None]:
    """The files of ``split`` (in :func:`load_image_folder`'s order) and their captions (flat folders) or None."""
    files, labels, _ = list_images(folder)
    if len(files) < 2:
        raise UserError(f"{folder}: holds only {len(files)} image; add images (the test split needs at least one)")
    idx = fixed_split_indices(len(files), split)
    captions = read_captions(folder, files) if labels is None else None
    return [files[j] for j in idx], None if captions is None else [captions[j] for j in idx]


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in paths
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _open(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 -- PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: BaseException) -> UserError:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"{path}: cannot decode this image ({msg}); re-save it as PNG or JPEG, or delete it")


def _is_gray(im) -> bool:
    if im.mode in _GRAY_MODES:
        return True
    if im.mode == "P":  # palette image: gray when every palette entry has r == g == b
        pal = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
        return len(pal) > 0 and bool((pal == pal[:, :1]).all())
    return False


def _to_array(im, resolution: int, channels: int) -> np.ndarray:
    """Decode, convert to L/RGB, resize the shorter side to ``resolution`` (bicubic), centre-crop: uint8 array."""
    from PIL import Image

    if im.mode.startswith("I"):  # 16-bit gray PNG: to 8 bits (PIL's convert("L") would clip at 255)
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    # torchvision Resize(int): shorter side -> resolution, longer side truncated; CenterCrop rounds the offsets
    if w <= h:
        size = (resolution, max(resolution, int(resolution * h / w)))
    else:
        size = (max(resolution, int(resolution * w / h)), resolution)
    im = im.resize(size, resample=Image.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))
    top_ = int(round((size[1] - resolution) / 2.0))
    im = im.crop((left, top_, left + resolution, top_ + resolution))
    return np.asarray(im, dtype=np.uint8)
