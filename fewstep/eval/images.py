"""Pictures for people: sample grids, 2-D scatter plots and metric curves, written atomically in the format the
file's suffix names (:data:`GRID_FORMATS` for grids, Pillow; :data:`FIGURE_FORMATS` for plots, matplotlib).

Matplotlib is used through ``Figure`` + the Agg canvas, never pyplot, so no global state or display is touched.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import UserError
from ..io import atomic_write_bytes

MIN_TILE_PX = 48  # an 8x8 digit is upscaled 6x so it can be seen
GRID_ROW = 10  # images per row of save_samples' grids
#: the most pixels a grid may have: Pillow's limit for opening an image (Image.MAX_IMAGE_PIXELS, its guard against
#: decompression bombs), so that every grid written can be read back
MAX_GRID_PIXELS = 89_478_485
#: the most points a scatter plot draws: more is one blot, and takes minutes to render
MAX_PLOT_POINTS = 1_000_000
#: suffix -> Pillow format of the sample grids it can write
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".pdf": "PDF"}
#: suffix -> matplotlib format of scatter plots and curves
FIGURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".pdf": "pdf", ".svg": "svg"}


def output_format(path: str | os.PathLike, figure: bool = False) -> str:
    """The format a grid (``figure=False``) or a plot is written in, from ``path``'s suffix; an unknown suffix is a
    one-line error listing the choices."""
    table = FIGURE_FORMATS if figure else GRID_FORMATS
    suffix = Path(path).suffix.lower()
    if suffix not in table:
        what = "a scatter plot" if figure else "a sample grid"
        given = f"suffix {Path(path).suffix!r}" if suffix else "no suffix"
        raise UserError(f"{path} has {given}; {what} is written as {', '.join(table)}: name the file with one of "
                        "them (or give a folder, DIR/, for DIR/samples.png)")
    return table[suffix]


#: the largest side in pixels each Pillow format can encode
MAX_SIDE = {"JPEG": 65_535, "WEBP": 16_383, "PDF": 65_500}


def check_output(path: str | os.PathLike, sample_shape: tuple[int, ...], n: int | None = None) -> str:
    """:func:`output_format` of :func:`save_samples`' picture of ``n`` samples shaped ``sample_shape`` (3-D: a grid;
    else a scatter plot), and for a grid, that the format can encode its size; call it before sampling."""
    figure = len(sample_shape) != 3
    fmt = output_format(path, figure=figure)
    if not figure and n is not None and fmt in MAX_SIDE:
        side = max(grid_size(n, *sample_shape[-2:], GRID_ROW))
        if side > MAX_SIDE[fmt]:
            raise UserError(f"{path}: a grid of {n} samples is {side:,} pixels long, but {fmt} encodes at most "
                            f"{MAX_SIDE[fmt]:,}; write it as .png or pass a smaller --n")
    return fmt


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)


def grid_size(n: int, h: int, w: int, nrow: int | None = None, scale: int | None = None) -> tuple[int, int]:
    """``(height, width)`` in pixels of :func:`save_grid`'s grid of ``n`` ``h x w`` images."""
    return _grid_layout(n, h, w, nrow, scale)[:2]


def _grid_layout(n: int, h: int, w: int, nrow: int | None, scale: int | None) -> tuple[int, int, int, int, int]:
    """Height, width, images per row, upscaling factor and gutter of a grid (see :func:`save_grid`)."""
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = scale or max(1, math.ceil(MIN_TILE_PX / min(h, w)))
    pad = 2  # grey gutter between tiles, in output pixels
    rows = math.ceil(n / nrow)
    return rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, nrow, scale, pad


def check_picture(n: int, sample_shape: tuple[int, ...], flag: str = "--n") -> None:
    """Refuse in one line a picture of ``n`` samples that :func:`save_samples` should not make: a grid of more than
    :data:`MAX_GRID_PIXELS` pixels, or a scatter plot of more than :data:`MAX_PLOT_POINTS` points. Call it before
    sampling."""
    if len(sample_shape) != 3:
        if n > MAX_PLOT_POINTS:
            raise UserError(f"{flag} {n} points make one blot of a scatter plot; a plot draws at most "
                            f"{MAX_PLOT_POINTS:,}: pass {flag} {MAX_PLOT_POINTS} or fewer (fewstep eval measures more)")
        return
    h, w = sample_shape[-2:]
    height, width = grid_size(n, h, w, GRID_ROW)
    if height * width > MAX_GRID_PIXELS:
        one, two = grid_size(GRID_ROW, h, w, GRID_ROW)[0], grid_size(2 * GRID_ROW, h, w, GRID_ROW)[0]
        most = (MAX_GRID_PIXELS // width - (2 * one - two)) // (two - one) * GRID_ROW
        raise UserError(f"{flag} {n} makes a {width:,} x {height:,} pixel grid ({height * width / 1e6:,.0f} "
                        f"megapixels); a grid holds at most {MAX_GRID_PIXELS / 1e6:.1f} megapixels (Pillow's "
                        f"limit for reading one back), {most:,} of these samples: pass {flag} {most} or fewer")


def save_grid(
    images: Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int | None = None
) -> Path:
    """Write images as one grid picture, upscaled with nearest neighbour so each tile is at least 48 px.

    Args:
        images: ``(N, C, H, W)`` in ``[-1, 1]``, C in {1, 3}; values outside are clipped.
        path: the file to write (its suffix picks the format).
        nrow: images per row (default: ceil(sqrt(N))).
        scale: integer upscaling factor (default: the smallest one reaching 48 px).
    """
    from PIL import Image

    x = _numpy(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise UserError(f"save_grid takes images (N, 1 or 3, H, W) with N >= 1, got shape {x.shape}")
    fmt = output_format(path)
    n, c, h, w = x.shape
    height, width, nrow, scale, pad = _grid_layout(n, h, w, nrow, scale)
    th, tw = h * scale, w * scale
    canvas = np.full((height, width, c), 128, dtype=np.uint8)
    tiles = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)  # NHWC
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        top, left = pad + r * (th + pad), pad + col * (tw + pad)
        canvas[top : top + th, left : left + tw] = tile
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    buf = io.BytesIO()
    if fmt in MAX_SIDE and max(height, width) > MAX_SIDE[fmt]:
        raise UserError(f"{path}: a {width:,} x {height:,} pixel grid is too large for {fmt} (at most "
                        f"{MAX_SIDE[fmt]:,} pixels a side); write it as .png or with fewer images")
    img.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return atomic_write_bytes(path, buf.getvalue())


def save_labelled_grid(images: Tensor | np.ndarray, path: str | os.PathLike, row_labels: list[str],
                       col_labels: list[str] | None = None, title: str | None = None) -> Path:
    """Write a grid of images ``(R, C, ch, H, W)`` in ``[-1, 1]`` with each row labelled on its left (e.g. by the
    prompt its images were made for) and optionally each column on top (e.g. the model and noise)."""
    from matplotlib.figure import Figure

    x = _numpy(images)
    if x.ndim != 5 or x.shape[2] not in (1, 3) or 0 in x.shape[:2]:
        raise UserError(f"save_labelled_grid takes images (rows, columns, 1 or 3, H, W), got shape {x.shape}")
    rows, cols = x.shape[:2]
    if len(row_labels) != rows or (col_labels is not None and len(col_labels) != cols):
        raise UserError(f"{rows} x {cols} images need {rows} row labels and {cols} column labels, got "
                        f"{len(row_labels)} and {len(col_labels or [])}")
    ch, h, w = x.shape[2:]
    pad = 1  # grey gutter between tiles, in image pixels
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, ch), 128, dtype=np.uint8)
    tiles = ((np.clip(x, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 1, 3, 4, 2)  # R C H W ch
    for r in range(rows):
        for c in range(cols):
            canvas[pad + r * (h + pad) : (r + 1) * (h + pad), pad + c * (w + pad) : (c + 1) * (w + pad)] = tiles[r, c]
    fig = Figure(figsize=(0.62 * cols + 3.0, 0.62 * rows + (0.9 if col_labels else 0.3)))
    ax = fig.add_subplot(1, 1, 1)  # one picture (fast to draw), its ticks the labels
    ax.imshow(canvas[..., 0] if ch == 1 else canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 - 0.5 for r in range(rows)], row_labels, fontsize=8)
    if col_labels:
        ax.xaxis.tick_top()
        ax.set_xticks([pad + c * (w + pad) + w / 2 - 0.5 for c in range(cols)], col_labels, fontsize=6.5)
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return _save_figure(fig, path)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = output_format(path, figure=True)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def save_points(
    points: Tensor | np.ndarray,
    path: str | os.PathLike,
    reference: Tensor | np.ndarray | None = None,
    title: str | None = None,
    lim: float | tuple[float, float] | None = None,
) -> Path:
    """Scatter plot of 2-D points (first two coordinates if D > 2), the reference in grey beneath.

    Args:
        points: ``(N, D)`` samples, D >= 2; drawn in colour.
        path: the file to write (its suffix picks the format).
        reference: ``(M, D)`` points drawn in light grey underneath (e.g. the data).
        title: figure title.
        lim: axis limits: ``a`` for ``[-a, a]`` on both axes, or ``(lo, hi)``; default: fit all points.
    """
    from matplotlib.figure import Figure

    p = _numpy(points)
    if p.ndim != 2 or p.shape[1] < 2:
        raise UserError(f"save_points takes points (N, D) with D >= 2, got shape {p.shape}")
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = _numpy(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", linewidths=0, label="reference", rasterized=True)
    ax.scatter(p[:, 0], p[:, 1], s=2, c="tab:blue", linewidths=0, label="samples", rasterized=True)
    if lim is not None:
        lo, hi = (-lim, lim) if np.isscalar(lim) else lim
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    if title:
        ax.set_title(title + ("" if p.shape[1] == 2 else f" (dims 0, 1 of {p.shape[1]})"), fontsize=10)
    if reference is not None:
        ax.legend(loc="upper right", fontsize=7, markerscale=4)
    return _save_figure(fig, path)


def plot_curves(
    rows: list[dict], keys: list[str], path: str | os.PathLike, x: str = "it", title: str | None = None
) -> Path:
    """Line plot of metrics over training (e.g. rows of ``metrics.jsonl``); log-scale y when every value is > 0.

    Args:
        rows: dicts holding ``x`` and some of ``keys``; rows missing a key (or holding None/NaN) are skipped for it.
        keys: the metrics to draw, one line each.
        path: the file to write (its suffix picks the format).
        x: the key of the horizontal axis.
        title: figure title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    values: list[float] = []
    for key in keys:
        pts = [(float(r[x]), float(r[key])) for r in rows
               if x in r and r.get(key) is not None and math.isfinite(float(r[key]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=key)
            values.extend(ys)
    if not values:
        raise UserError(f"no finite values of {keys} against {x!r} in the {len(rows)} rows given; "
                        "check the metric names")
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(fig, path)


def plot_nfe_frontier(
    curves: dict[str, list[tuple[float, float]]],
    points: list[tuple[str, float, float, float | None]],
    path: str | os.PathLike,
    metric: str = "fid",
    title: str | None = None,
    groups: list[str] | None = None,
) -> Path:
    """Quality against NFE: a teacher's curve per sampler and each student as a point (with an error bar when its
    std is given); log-scale NFE, log-scale quality when every value is > 0 (lower is better for FID and sliced W).

    Args:
        curves: ``{sampler: [(nfe, value), ...]}``, drawn as lines in NFE order.
        points: ``(label, nfe, value, std or None)``, drawn as markers.
        path: the file to write (its suffix picks the format).
        metric: the vertical axis' label.
        title: figure title.
        groups: one name per point (e.g. its method): a group shares a colour, its points take markers in turn, and
            the groups are set a little apart along NFE so that points at the same NFE do not hide each other.
            Default: each point its own colour.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    values: list[float] = []
    for sampler, pts in curves.items():
        pts = sorted((float(n), float(v)) for n, v in pts if v is not None and math.isfinite(float(v)))
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"teacher ({sampler})")
            values.extend(ys)
    grouped = groups is not None
    if grouped and len(groups) != len(points):
        raise ValueError(f"groups has {len(groups)} names for {len(points)} points")
    if not grouped:
        groups = [str(i) for i in range(len(points))]
    index = {name: g for g, name in enumerate(dict.fromkeys(groups))}  # group -> its colour's place
    markers = ["*", "o", "s", "D", "^", "v", "P", "X"]
    drawn: dict[str, int] = {}  # group -> its points drawn so far
    for (label, n, v, std), group in zip(points, groups):
        if v is None or not math.isfinite(float(v)):
            continue
        g, k = index[group], drawn.get(group, 0)
        drawn[group] = k + 1
        # on the log2 axis a factor 2^(0.05 d) moves a point 0.05 of an octave: apart, yet at its NFE
        shift = 2 ** (0.05 * (g - (len(index) - 1) / 2)) if grouped else 1.0
        marker = markers[k % len(markers)] if grouped else "*"
        ax.errorbar([float(n) * shift], [float(v)], yerr=None if std is None else [[float(std)], [float(std)]],
                    fmt=marker, markersize=11 if marker == "*" else 7, capsize=3, color=f"C{len(curves) + g}",
                    label=label, zorder=3)
        values.append(float(v))
    if not values:
        raise UserError(f"no finite {metric} to plot against NFE; check the rows measured")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 1, 2, 4 ... rather than 2^0, and 6 rather than 6 x 10^0
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plain)
    if min(values) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save_figure(fig, path)


def save_samples(
    x: Tensor | np.ndarray, path: str | os.PathLike, data: str | None = None, title: str | None = None
) -> Path:
    """Images as a grid (10 per row), points as a scatter over the held-out split of ``data`` when given; the
    format is the suffix's (:func:`check_output`)."""
    check_output(path, tuple(np.shape(x))[1:], len(x))
    if np.ndim(x) == 4:
        return save_grid(x, path, nrow=GRID_ROW)
    reference = None
    if data:
        from ..data import load_data

        reference = load_data(data, "test").x
    return save_points(x, path, reference=reference, title=title)
