"""Evaluation: Frechet distance, digits-feature FID, Inception FID, patch FID, CLIP score, precision/recall, class
accuracy, 2-D metrics; sample grids, plots and the HTML report.

Names are imported lazily (PEP 562) so ``import fewstep.eval`` stays light (no matplotlib, no torchmetrics) and
``python -m fewstep.eval.classifier`` runs without the package importing its own ``__main__``.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "feature_stats": "metrics",
    "frechet_distance": "metrics",
    "precision_recall": "metrics",
    "sliced_wasserstein": "metrics",
    "mode_metrics": "metrics",
    "DigitsClassifier": "classifier",
    "train_digits_classifier": "classifier",
    "save_classifier": "classifier",
    "load_digits_classifier": "classifier",
    "inception_fid": "inception",
    "patch_fid": "inception",
    "clip_score": "clip",
    "load_clip": "clip",
    "save_grid": "images",
    "save_points": "images",
    "plot_curves": "images",
    "write_report": "report",
    "evaluate_samples": "evaluate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
