"""Point files: ``.npy`` holding an ``(N, D)`` float array, or ``.csv`` with numeric columns and an optional header.

Points are standardised with the train split's per-dimension mean and one overall std (so the shape of the data is
kept), and the fixed train/test split is shared with image folders (:func:`fixed_split_indices`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

POINT_SUFFIXES = (".npy", ".csv")
SPLIT_SEED = 0


def fixed_split_indices(n: int, split: str) -> np.ndarray:
    """Indices of ``split`` in a fixed permutation (seed 0) of ``range(n)``: the last 10 % (at least 1) are the test.

    Args:
        n: number of items (>= 2, so that both splits are non-empty).
        split: ``"train"`` or ``"test"``.
    """
    assert n >= 2 and split in ("train", "test"), (n, split)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = max(1, n // 10)
    return np.sort(perm[n - n_test:] if split == "test" else perm[: n - n_test])


def read_points(path: str | Path) -> np.ndarray:
    """The validated ``(N, D)`` float64 array of a ``.npy`` or ``.csv`` point file (N >= 2, all finite).

    Args:
        path: the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = _read_npy(path)
    elif suffix == ".csv":
        x = _read_csv(path)
    else:
        raise UserError(f"{path}: point files must be .npy or .csv, not {path.suffix or 'no suffix'!r}; convert it")
    if x.ndim != 2:
        raise UserError(f"{path}: points must be a 2-D array (N, D), got shape {tuple(x.shape)}; reshape it to (N, D)")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise UserError(f"{path}: needs at least 2 points of at least 1 dimension, got shape {tuple(x.shape)}; add points")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError(
            f"{path}: {int(bad.sum())} value(s) are NaN or infinite (first at row {row}, column {col}); "
            "remove or fix those points"
        )
    return x


def load_points(path: str | Path, split: str) -> tuple[Tensor, Tensor, Tensor]:
    """The ``split`` of a point file, standardised with the train split's statistics.

    Returns ``(x, shift, scale)``: ``x`` float32 ``(N, D)`` in normalised coordinates, ``shift`` ``(D,)`` the train
    mean and ``scale`` a 0-dim tensor, the train split's overall std, so ``x_raw = x * scale + shift``.

    Args:
        path: a ``.npy`` or ``.csv`` file.
        split: ``"train"`` or ``"test"``.
    """
    raw = read_points(path)
    train = raw[fixed_split_indices(len(raw), "train")]
    shift = train.mean(axis=0)
    scale = float(np.sqrt(((train - shift) ** 2).mean()))  # one std over every coordinate
    if not scale > 1e-12:  # a single train point, or all identical: keep the raw scale
        scale = 1.0
    x = (raw[fixed_split_indices(len(raw), split)] - shift) / scale
    return (
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(shift.astype(np.float32)),
        torch.tensor(scale, dtype=torch.float32),
    )


def _read_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- numpy raises ValueError/OSError/EOFError/... on bad files
        raise UserError(f"{path}: not a readable .npy array ({type(e).__name__}: {_first_line(e)}); "
                        "save it with numpy.save(path, array)") from None
    if not isinstance(x, np.ndarray):  # an .npz archive renamed .npy
        raise UserError(f"{path}: holds an archive, not one array; save a single (N, D) array with numpy.save")
    if x.dtype.kind not in "fiu":
        raise UserError(f"{path}: array dtype {x.dtype} is not a real number type; save a float array (N, D)")
    return x.astype(np.float64)


def _read_csv(path: Path) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f)) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read it as a text .csv ({_first_line(e)}); "
                        "write comma-separated numbers, one point per line") from None
    if rows and not any(_is_number(c) for c in rows[0][1]):
        rows = rows[1:]  # header row
    if not rows:
        raise UserError(f"{path}: holds no points; write comma-separated numbers, one point per line")
    width = len(rows[0][1])
    values = []
    for line, row in rows:
        if len(row) != width:
            raise UserError(f"{path}: line {line} has {len(row)} columns, line {rows[0][0]} has {width}; "
                            "give every point the same number of columns")
        try:
            values.append([float(c) for c in row])
        except ValueError:
            col, cell = next((j + 1, c) for j, c in enumerate(row) if not _is_number(c))
            raise UserError(f"{path}: line {line}, column {col} is {cell.strip()!r}, not a number; "
                            "use numeric columns only (one optional header row is allowed)") from None
    return np.asarray(values, dtype=np.float64)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
