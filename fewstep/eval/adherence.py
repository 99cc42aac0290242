"""Prompt adherence, FID, precision and recall for the embedded ``shapes`` data (:mod:`fewstep.data.shapes`).

An :class:`AttributeClassifier` (a small CNN, trained in seconds on freshly drawn images of *every* attribute
combination, held-out compositions included: it is the ruler, not the model under test) reads shape, colour,
position and size off an image. Then:

- **adherence**: the share of samples whose checked attributes -- those the prompt names
  (:func:`fewstep.data.shapes.parse_prompt`) -- all match the prompt; ``adherence_<attribute>`` per attribute;
  ``adherence_heldout`` / ``adherence_seen`` over the prompts of held-out / seen (shape, colour) compositions. The
  analogue of CLIP score, but exact up to the classifier's error (its test accuracy is in the shipped JSON).
- **fid**, **precision**, **recall** (k = 3) on the classifier's penultimate features, against real images drawn for
  the same prompts (the attributes a prompt leaves out drawn at random), so a held-out prompt file measures FID on the
  held-out compositions.

Build the shipped weights with ``python -m fewstep.eval.adherence --out fewstep/zoo/shapes_classifier``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..data.shapes import ATTRIBUTES, decode_labels, draw, is_heldout, parse_prompt, random_attributes, shapes_arrays
from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json
from .metrics import feature_stats, frechet_distance, precision_recall

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "zoo" / "shapes_classifier"
BUILD_COMMAND = "python -m fewstep.eval.adherence --out fewstep/zoo/shapes_classifier"
HEADS = {name: len(values) for name, values in ATTRIBUTES.items()}  # shape 4, colour 4, position 4, size 2
REFERENCE_SEED = 12345  # the real images drawn as FID's reference


class AttributeClassifier(nn.Module):
    """CNN on ``(B, 3, 16, 16)`` images in ``[-1, 1]``: ``features`` ``(B, feature_dim)`` and one logit head per
    attribute.

    Args:
        width: channels of the first conv layer (then 2x, 2x).
        feature_dim: width of the penultimate layer.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(width=width, feature_dim=feature_dim)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, sum(HEADS.values()))
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (SiLU: no dead units, the feature covariance keeps full rank)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 16, 16):
            raise UserError(f"the shapes classifier takes (B, 3, 16, 16) images, got {tuple(x.shape)}")
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 16 -> 8
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 8 -> 4
        return F.silu(self.fc(h.flatten(1)))

    def logits(self, x: Tensor) -> dict[str, Tensor]:
        """``{attribute: (B, values)}``."""
        out = self.head(self.features(x))
        return dict(zip(HEADS, out.split(list(HEADS.values()), dim=1)))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, np.ndarray]:
        """Features ``(N, D)`` and predicted attribute indices ``(N, 4)``; images clipped to [-1, 1]."""
        feats, preds = [], []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].float().clamp(-1, 1)
            f = self.features(xb)
            out = self.head(f).split(list(HEADS.values()), dim=1)
            feats.append(f)
            preds.append(torch.stack([o.argmax(1) for o in out], 1))
        return torch.cat(feats), torch.cat(preds).numpy()


def train_attribute_classifier(n: int = 16384, epochs: int = 4, seed: int = 0, batch_size: int = 128,
                               lr: float = 2e-3, log: Any = None) -> tuple[AttributeClassifier, dict[str, float]]:
    """Train on ``n`` fresh drawings over every attribute combination, with Gaussian pixel noise of std up to 0.2
    (robust to a generator's small artefacts); returns the classifier and its accuracy per attribute on the shapes
    test split."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier()
    attrs = random_attributes(n, seed + 100)
    x, y = draw(attrs, seed + 101), torch.from_numpy(attrs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        noise = torch.randn((batch_size, 3, 16, 16), generator=gen) * torch.rand((batch_size, 1, 1, 1), generator=gen)
        out = model.logits(x[idx] + 0.2 * noise)
        loss = sum(F.cross_entropy(o, y[idx, k]) for k, o in enumerate(out.values()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"step {step + 1}/{steps}  loss {float(loss):.4f}")
    model.eval()
    xt, yt, _ = shapes_arrays("test")
    _, pred = model.predict(xt)
    truth = decode_labels(yt)
    acc = {f"test_accuracy_{a}": float((pred[:, k] == truth[:, k]).mean()) for k, a in enumerate(HEADS)}
    acc["test_accuracy_all"] = float((pred == truth).all(1).mean())
    return model, acc


def save_attribute_classifier(model: AttributeClassifier, prefix: str | Path, meta: dict[str, Any]) -> None:
    prefix = Path(prefix)
    atomic_write_bytes(prefix.with_suffix(".safetensors"),
                       save({k: v.contiguous() for k, v in model.state_dict().items()}))
    atomic_write_json(prefix.with_suffix(".json"), {"config": model.config, "meta": meta})


_CACHE: dict[str, AttributeClassifier] = {}


def load_attribute_classifier(prefix: str | Path | None = None) -> AttributeClassifier:
    """The shipped classifier (``fewstep/zoo/shapes_classifier``) or the one at ``prefix``; eval mode, frozen."""
    prefix = Path(prefix) if prefix is not None else DEFAULT_PATH
    key = str(prefix.resolve())
    if key in _CACHE:
        return _CACHE[key]
    w, j = prefix.with_suffix(".safetensors"), prefix.with_suffix(".json")
    if not w.is_file() or not j.is_file():
        raise UserError(f"the shapes classifier {w} is missing; rebuild it with `{BUILD_COMMAND}` (seconds)")
    model = AttributeClassifier(**json.loads(j.read_text())["config"])
    model.load_state_dict(load_file(str(w)))
    model.eval().requires_grad_(False)
    _CACHE[key] = model
    return model


def prompt_attributes(prompts: list[str]) -> list[dict[str, int]]:
    """The checked attributes of each prompt (``{attribute: value index}``)."""
    return [parse_prompt(p) for p in prompts]


def reference_images(checked: list[dict[str, int]], n: int, seed: int = REFERENCE_SEED) -> Tensor:
    """``n`` real images for the prompts' attributes (cycled), the unnamed attributes drawn at random."""
    attrs = random_attributes(n, seed)
    for i in range(n):
        for k, name in enumerate(HEADS):
            if name in checked[i % len(checked)]:
                attrs[i, k] = checked[i % len(checked)][name]
    return draw(attrs, seed + 1)


#: the reference's features of the last few (classifier, prompts, count): every model of a run is measured on one
_REFERENCE_FEATURES: dict[tuple, tuple[AttributeClassifier, Tensor]] = {}


def _reference_features(model: AttributeClassifier, checked: list[dict[str, int]], n: int) -> Tensor:
    """``model``'s features of :func:`reference_images` ``(checked, n)``, drawn and classified once per key."""
    key = (id(model), n, tuple(tuple(sorted(c.items())) for c in checked))
    hit = _REFERENCE_FEATURES.get(key)
    if hit is None or hit[0] is not model:  # (the model itself is kept: an id is reused once its object is freed)
        if len(_REFERENCE_FEATURES) >= 8:
            _REFERENCE_FEATURES.pop(next(iter(_REFERENCE_FEATURES)))
        hit = _REFERENCE_FEATURES[key] = (model, model.predict(reference_images(checked, n))[0])
    return hit[1]


def evaluate_shapes(samples: Tensor, prompts: list[str] | None = None, labels: Tensor | None = None,
                    classifier: AttributeClassifier | None = None, reference_n: int = 2048) -> dict[str, Any]:
    """Adherence, FID, precision and recall of images ``(N, 3, 16, 16)`` made for ``prompts`` (one per sample) or
    for class ``labels`` (shapes class indices), or unconditionally (neither: no adherence; the reference is every
    combination).

    Args:
        samples: images in ``[-1, 1]``.
        prompts: the prompt of each sample.
        labels: the shapes class of each sample (a class-conditional model), instead of prompts.
        classifier: default the shipped one.
        reference_n: real images drawn as FID's reference (at least the number of samples).
    """
    x = torch.as_tensor(samples).detach().cpu().float()
    n = len(x)
    if n < 2:
        raise UserError("no samples to evaluate; pass at least a few samples (n >= 10)")
    model = classifier if classifier is not None else load_attribute_classifier()
    if prompts is not None:
        if len(prompts) != n:
            raise UserError(f"got {len(prompts)} prompts for {n} samples; pass one prompt per sample")
        checked = prompt_attributes(list(prompts))
    elif labels is not None:
        y = decode_labels(torch.as_tensor(labels).cpu())
        if len(y) != n:
            raise UserError(f"got {len(y)} labels for {n} samples; pass one label per sample")
        checked = [dict(zip(HEADS, (int(v) for v in row))) for row in y]
    else:
        checked = [{}]
    f_fake, pred = model.predict(x)
    f_real = _reference_features(model, checked, max(reference_n, n))
    precision, recall = precision_recall(f_real, f_fake, k=3)
    out: dict[str, Any] = {"fid": frechet_distance(*feature_stats(f_fake), *feature_stats(f_real)),
                           "precision": precision, "recall": recall, "adherence": None}
    if prompts is None and labels is None:
        return out
    ok = np.ones(n, dtype=bool)
    for k, name in enumerate(HEADS):
        named = np.array([name in checked[i] for i in range(n)])
        match = np.array([checked[i].get(name, -1) == pred[i, k] for i in range(n)])
        ok &= match | ~named
        out[f"adherence_{name}"] = float(match[named].mean()) if named.any() else None
    out["adherence"] = float(ok.mean())
    pair = np.array([[c.get("shape", -1), c.get("colour", -1)] for c in checked[:n]])
    full = (pair >= 0).all(1)
    held = np.zeros(n, dtype=bool)
    held[full] = is_heldout(np.concatenate([pair[full], np.zeros((full.sum(), 2), dtype=np.int64)], 1))
    out["adherence_heldout"] = float(ok[held].mean()) if held.any() else None
    out["adherence_seen"] = float(ok[full & ~held].mean()) if (full & ~held).any() else None
    out["heldout_share"] = float(held.mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the shapes attribute classifier (fewstep's adherence ruler).")
    p.add_argument("--out", required=True, help="output prefix (writes .safetensors and .json)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # bit-for-bit the same weights on every machine with the same torch
    start = time.perf_counter()
    model, acc = train_attribute_classifier(seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    meta = {"command": BUILD_COMMAND, "seed": a.seed, "seconds": round(time.perf_counter() - start, 1), **acc}
    save_attribute_classifier(model, a.out, meta)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
