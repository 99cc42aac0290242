"""Sample-quality metrics on feature vectors and points: Frechet distance, improved precision/recall, sliced
Wasserstein, and mode coverage for the 2-D mixtures."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

def _as_2d_numpy(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise UserError(f"{name} must be a 2-D array (N, D), got shape {tuple(x.shape)}; flatten the samples first")
    return x


def _as_2d_tensor(x: np.ndarray | Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x.detach().cpu() if isinstance(x, Tensor) else np.asarray(x), dtype=torch.float64)
    if x.ndim != 2:
        raise UserError(f"{name} must be a 2-D array (N, D), got shape {tuple(x.shape)}; flatten the samples first")
    return x


def feature_stats(feats: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of features ``(N, D)``, both float64.

    Args:
        feats: feature vectors, one per row; at least 2 rows.
    """
    f = _as_2d_numpy(feats, "feats")
    if f.shape[0] < 2:
        raise UserError(f"feature statistics need at least 2 samples, got {f.shape[0]}; pass more samples")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative round-off eigenvalues clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): S1 S2 is similar to the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), so the trace is the sum of square roots of its eigenvalues. Two symmetric
    eigendecompositions replace scipy's ``sqrtm`` (no complex parts, no singular-matrix warnings).

    Args:
        mu1, sigma1: mean ``(D,)`` and covariance ``(D, D)`` of the first set (e.g. generated).
        mu2, sigma2: the same for the second set (e.g. reference).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(
            f"Frechet distance needs matching shapes, got mu {mu1.shape} vs {mu2.shape} and sigma {s1.shape} vs "
            f"{s2.shape}; compute both statistics from features of the same network"
        )
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # round-off can give -1e-12 for identical inputs


def _kth_nn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest neighbour in ``x``, excluding itself."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype)
    for i in range(0, n, chunk):
        d = torch.cdist(x[i : i + chunk], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = math.inf  # exclude self (by index, so duplicates still count as neighbours)
        radii[i : i + chunk] = d.kthvalue(k, dim=1).values
    return radii


def _coverage(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> float:
    """Share of ``queries`` inside at least one ball ``B(centres[j], radii[j])``."""
    inside = 0
    for i in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[i : i + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_feats: np.ndarray | Tensor, fake_feats: np.ndarray | Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3).

    Each set's manifold is the union of balls around its points with radius the distance to the point's k-th
    nearest neighbour in the same set. Precision = share of fake samples inside the real manifold; recall = share of
    real samples inside the fake manifold. Distances are computed ``chunk`` rows at a time (10k x 10k fits).

    Args:
        real_feats: reference features ``(N, D)``.
        fake_feats: generated features ``(M, D)``.
        k: neighbourhood size (the paper uses 3).
        chunk: rows per distance block.
    """
    real = _as_2d_tensor(real_feats, "real_feats")
    fake = _as_2d_tensor(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"real and fake features differ in width ({real.shape[1]} vs {fake.shape[1]}); "
                        "use the same feature network for both")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise UserError(f"precision/recall with k={k} need more than {k} samples per set, got "
                        f"{real.shape[0]} real and {fake.shape[0]} fake; pass more samples")
    r_real = _kth_nn_radii(real, k, chunk)
    r_fake = _kth_nn_radii(fake, k, chunk)
    return _coverage(fake, real, r_real, chunk), _coverage(real, fake, r_fake, chunk)


def _w1_sorted(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Exact 1-D Wasserstein-1 between empirical distributions, per row of sorted ``xs (P, N)``, ``ys (P, M)``.

    W1 = int_0^1 |F^-1(q) - G^-1(q)| dq; both quantile functions are piecewise constant with breaks at i/N and j/M,
    so the integral is a finite sum over the merged breakpoints.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return np.abs(xs - ys).mean(axis=1)
    q = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)  # sorted breakpoints in [0, 1]
    widths, mids = np.diff(q), (q[1:] + q[:-1]) / 2
    ix = np.minimum((mids * n).astype(np.int64), n - 1)
    iy = np.minimum((mids * m).astype(np.int64), m - 1)
    return (widths * np.abs(xs[:, ix] - ys[:, iy])).sum(axis=1)


def sliced_wasserstein(
    x: np.ndarray | Tensor, y: np.ndarray | Tensor, n_projections: int = 512, seed: int = 0
) -> float:
    """Sliced Wasserstein-1 distance (Rabin et al. 2011): the mean over random unit directions theta of
    W1(theta . x, theta . y). Sets may differ in size (exact quantile integral, see ``_w1_sorted``).

    Args:
        x: samples ``(N, D)``.
        y: samples ``(M, D)``.
        n_projections: number of random directions (uniform on the sphere).
        seed: seed of the directions, so the value is reproducible.
    """
    a, b = _as_2d_numpy(x, "x"), _as_2d_numpy(y, "y")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"sliced Wasserstein needs the same dimension, got {a.shape[1]} and {b.shape[1]}; "
                        "compare samples with data of the same shape")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise UserError("sliced Wasserstein needs at least one sample in each set; pass non-empty arrays")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, a.shape[1], generator=g, dtype=torch.float64).numpy()
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    xs = np.sort(theta @ a.T, axis=1)  # (P, N); numpy's sort is ~10x faster than torch's here
    ys = np.sort(theta @ b.T, axis=1)
    return float(_w1_sorted(xs, ys).mean())


def mode_metrics(
    samples: np.ndarray | Tensor,
    modes: np.ndarray | Tensor,
    mode_std: float | np.ndarray | Tensor,
    n_sigma: float = 3.0,
) -> dict[str, float | int]:
    """Mode coverage and sample quality on a mixture with known modes (the 2-D toys).

    Rule: a sample is *high quality* if its Euclidean distance to the nearest mode is at most
    ``n_sigma * mode_std`` (of that mode). A mode is *covered* if at least ``max(1, 0.1 * N / M)`` high-quality samples
    have it as nearest mode, i.e. 10 % of its share under uniform coverage, so a few stray samples do not count.

    Args:
        samples: generated points ``(N, D)``.
        modes: mode centres ``(M, D)``.
        mode_std: per-coordinate standard deviation of each mode: a scalar or ``(M,)``.
        n_sigma: radius of the high-quality ball in units of ``mode_std``.

    Returns:
        ``{"modes_covered": int, "high_quality": float}`` (the latter a share in [0, 1]).
    """
    s, mu = _as_2d_tensor(samples, "samples"), _as_2d_tensor(modes, "modes")
    if s.shape[1] != mu.shape[1]:
        raise UserError(f"samples have dimension {s.shape[1]} but modes {mu.shape[1]}; evaluate against the "
                        "dataset the model was trained on")
    n, m = s.shape[0], mu.shape[0]
    if n == 0:
        raise UserError("mode metrics need at least one sample; pass a non-empty array")
    std = torch.as_tensor(np.asarray(mode_std.detach().cpu() if isinstance(mode_std, Tensor) else mode_std),
                          dtype=torch.float64).reshape(-1)
    if std.numel() not in (1, m):
        raise UserError(f"mode_std must be a scalar or one value per mode ({m}), got {std.numel()} values")
    dist, nearest = torch.cdist(s, mu).min(dim=1)
    good = dist <= n_sigma * std.expand(m)[nearest]
    counts = torch.bincount(nearest[good], minlength=m)
    threshold = max(1.0, 0.1 * n / m)
    return {"modes_covered": int((counts >= threshold).sum()), "high_quality": float(good.double().mean())}
