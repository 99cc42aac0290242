"""Score generated samples against a data set: domain-feature FID / precision / recall / class accuracy for digits,
sliced Wasserstein and mode coverage for points."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .classifier import DigitsClassifier, load_digits_classifier
from .metrics import feature_stats, frechet_distance, mode_metrics, precision_recall, sliced_wasserstein

DIGITS_SHAPES = ((1, 8, 8), (1, 16, 16))


@torch.no_grad()
def _classify(model: DigitsClassifier, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Features ``(N, D)`` and predicted classes ``(N,)``; images clipped to [-1, 1] as when saved."""
    x = x.clamp(-1, 1)
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def evaluate_samples(
    samples: Tensor | np.ndarray,
    data: Any,
    labels: Tensor | np.ndarray | None = None,
    classifier: DigitsClassifier | None = None,
    reference: Tensor | np.ndarray | None = None,
    heldout: Any = None,
) -> dict[str, float | int | None]:
    """Metrics of ``samples`` against ``data``.

    Images (``data.kind == "image"``, digits shaped ``(1, 8, 8)`` or ``(1, 16, 16)``): ``fid`` (Frechet distance of
    classifier features), ``precision``, ``recall`` (k = 3) and ``class_accuracy`` (share of samples the classifier
    assigns to ``labels``; None without labels); pass the *train* split as ``data`` (as CIFAR-10 and ImageNet FIDs
    are computed: the larger reference, 1,437 digits against 360) and the test split as ``heldout`` for
    ``fid_heldout``, the memorisation check (a model that copies its training images scores far better on ``fid``
    than on ``fid_heldout``). Points: ``sliced_w`` against the reference (pass the test split: fresh draws of the
    same distribution), and ``modes_covered`` / ``high_quality`` when ``data.modes`` is known (else None).

    Args:
        samples: generated images ``(N, C, H, W)`` in ``[-1, 1]`` or points ``(N, D)``.
        data: a data set with ``kind``, ``x``, ``modes`` and ``mode_std`` (``fewstep.data.Dataset``).
        labels: the classes the samples were conditioned on ``(N,)``, or None.
        classifier: digits feature network (default: the shipped one, ``load_digits_classifier()``).
        reference: real samples to compare with (default: ``data.x``).
        heldout: images only: a second data set (the test split) for ``fid_heldout`` (None: not measured).

    Returns:
        A dict of plain Python numbers (or None).
    """
    x = torch.as_tensor(samples).detach().cpu().float()
    ref = torch.as_tensor(data.x if reference is None else reference).detach().cpu().float()
    if len(x) == 0:
        raise UserError("no samples to evaluate; pass at least a few samples (n >= 10)")
    if tuple(x.shape[1:]) != tuple(ref.shape[1:]):
        raise UserError(f"samples have shape {tuple(x.shape[1:])} but the data {tuple(ref.shape[1:])}; "
                        "evaluate against the data the model was trained on")
    if data.kind == "points":
        out: dict[str, float | int | None] = {"sliced_w": sliced_wasserstein(x, ref), "modes_covered": None,
                                              "high_quality": None}
        if getattr(data, "modes", None) is not None:
            out.update(mode_metrics(x, data.modes, data.mode_std))
        return out
    if data.kind != "image":
        raise UserError(f"unknown data kind {data.kind!r}; expected 'image' or 'points'")
    if tuple(x.shape[1:]) not in DIGITS_SHAPES:
        raise UserError(
            f"domain-feature FID exists for digits (1x8x8, 1x16x16) only, not {tuple(x.shape[1:])}; for other "
            "images use Inception FID (fewstep.eval.inception_fid, needs the Inception weights file)"
        )
    model = classifier if classifier is not None else load_digits_classifier()
    model.eval()
    f_fake, pred = _classify(model, x)
    f_real, _ = _classify(model, ref)
    precision, recall = precision_recall(f_real, f_fake, k=3)
    class_accuracy = None
    if labels is not None:
        y = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(y) != len(x):
            raise UserError(f"got {len(y)} labels for {len(x)} samples; pass one label per sample")
        class_accuracy = float((pred == y).double().mean())
    stats_fake = feature_stats(f_fake)
    out = {"fid": frechet_distance(*stats_fake, *feature_stats(f_real)), "precision": precision, "recall": recall,
           "class_accuracy": class_accuracy}
    if heldout is not None:
        f_held, _ = _classify(model, torch.as_tensor(heldout.x).detach().cpu().float())
        out["fid_heldout"] = frechet_distance(*stats_fake, *feature_stats(f_held))
    return out


def evaluate_against(samples: Tensor | np.ndarray, data: str, labels: Tensor | np.ndarray | None = None,
                     resolution: int | None = None, channels: int | None = None,
                     classifier: DigitsClassifier | None = None,
                     prompts: list[str] | None = None) -> dict[str, float | int | None]:
    """:func:`evaluate_samples` against the reference of data set ``data`` (a name, folder or file): digits-shaped
    images against the train split, with ``fid_heldout`` against the test split; points against the test split;
    ``shapes`` with :func:`fewstep.eval.adherence.evaluate_shapes` (adherence to ``prompts`` or ``labels``, FID,
    precision and recall against real images drawn for them)."""
    from ..data import load_data

    if data == "shapes":
        from .adherence import evaluate_shapes

        return evaluate_shapes(torch.as_tensor(samples), prompts=prompts, labels=None if prompts else labels)

    test = load_data(data, "test", resolution=resolution, channels=channels)
    if test.kind == "image" and tuple(test.sample_shape) in DIGITS_SHAPES:
        train = load_data(data, "train", resolution=resolution, channels=channels)
        return evaluate_samples(samples, train, labels=labels, classifier=classifier, heldout=test)
    return evaluate_samples(samples, test, labels=labels, classifier=classifier)
