"""The domain feature network for digits: a small CNN classifier whose penultimate activations give digits FID,
precision and recall (the role Inception-v3 plays for natural images), and whose predictions give class accuracy.

Build the shipped weights with ``python -m fewstep.eval.classifier --out fewstep/zoo/digits_classifier``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "zoo" / "digits_classifier"
BUILD_COMMAND = "python -m fewstep.eval.classifier --out fewstep/zoo/digits_classifier"


class DigitsClassifier(nn.Module):
    """CNN on ``(B, 1, 8, 8)`` digits in ``[-1, 1]``; ``(B, 1, 16, 16)`` inputs are average-pooled to 8x8 first.

    Args:
        width: channels of the first conv layer (then 2x, 2x).
        feature_dim: width of the penultimate layer returned by ``features``.
        num_classes: output classes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(width=width, feature_dim=feature_dim, num_classes=num_classes)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    @staticmethod
    def _to_8x8(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] not in ((8, 8), (16, 16)):
            raise UserError(f"the digits classifier takes (B, 1, 8, 8) or (B, 1, 16, 16) images, got "
                            f"{tuple(x.shape)}; use Inception FID (fewstep.eval.inception_fid) for other images")
        return F.avg_pool2d(x, 2) if x.shape[-1] == 16 else x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(B, feature_dim)``, the feature space of digits FID.

        SiLU rather than ReLU here: no dead units, so the feature covariance keeps full rank.
        """
        h = self._to_8x8(x)
        h = F.relu(self.conv1(h))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 8 -> 4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 4 -> 2
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(x))


def _augment(x: Tensor, g: torch.Generator, noise_std: float) -> Tensor:
    """Random +-1 pixel shifts (pad with background -1, random crop) and small Gaussian noise."""
    b, _, r, _ = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(r)[None, :])[:, :, None].expand(b, r, r)
    cols = (dx[:, None] + torch.arange(r)[None, :])[:, None, :].expand(b, r, r)
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    sigma = noise_std * torch.rand(b, 1, 1, 1, generator=g)  # per-image noise level in [0, noise_std]
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Share of ``x`` whose argmax prediction equals ``y``."""
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_digits_classifier(
    iterations: int = 1000, seed: int = 0, batch_size: int = 128, lr: float = 2e-3, noise_std: float = 0.2
) -> tuple[DigitsClassifier, float]:
    """Train the classifier on the digits train split; return it (in eval mode) and its test-split accuracy.

    Args:
        iterations: optimizer steps (Adam, cosine-decayed learning rate).
        seed: seeds the initialisation, the batches and the augmentation; the same seed gives the same weights.
        batch_size: images per step.
        lr: peak learning rate.
        noise_std: maximum std of the additive Gaussian noise augmentation.
    """
    from ..data.digits import digits_arrays

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = digits_arrays("train", 8)
    x_test, y_test = digits_arrays("test", 8)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1))
    model.train()
    for _ in range(iterations):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=g)
        xb = x_train[idx]
        # half the batch goes through the 16x16 round trip (bilinear up, average-pool down) seen at 16x16 eval
        up = F.interpolate(xb[: batch_size // 2], size=(16, 16), mode="bilinear", align_corners=False)
        xb = torch.cat([F.avg_pool2d(up.clamp(-1, 1), 2), xb[batch_size // 2 :]])
        loss = F.cross_entropy(model(_augment(xb, g, noise_std)), y_train[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, accuracy(model, x_test, y_test)


def save_classifier(model: DigitsClassifier, path: str | Path, accuracy: float, command: str) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (config, test accuracy, reproducing command).

    Args:
        model: the trained classifier.
        path: target path without suffix.
        accuracy: held-out (test split) accuracy to record.
        command: the command line that reproduces the weights.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = atomic_write_bytes(path.with_suffix(".safetensors"), save(state))
    meta = {"architecture": "DigitsClassifier", "config": model.config, "test_accuracy": accuracy,
            "command": command, "torch": torch.__version__}
    return weights, atomic_write_json(path.with_suffix(".json"), meta)


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """Load a classifier saved by ``save_classifier`` (default: the shipped ``fewstep/zoo/digits_classifier``).

    Args:
        path: path without suffix, or the ``.safetensors``/``.json`` file; ``None`` for the shipped weights.
    """
    base = DEFAULT_PATH if path is None else Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    weights, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for f in (weights, meta_path):
        if not f.is_file():
            raise UserError(f"digits classifier file {f} is missing; build it with `{BUILD_COMMAND}`"
                            + ("" if path is None else f" (with --out {base})"))
    meta = json.loads(meta_path.read_text())
    model = DigitsClassifier(**meta["config"])
    model.load_state_dict(load_file(str(weights)))
    model.test_accuracy = float(meta.get("test_accuracy", float("nan")))
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    """``python -m fewstep.eval.classifier --out PATH [--iterations N] [--seed S]``."""
    p = argparse.ArgumentParser(prog="python -m fewstep.eval.classifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output path without suffix (writes .safetensors and .json)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a tiny CNN gains nothing from threads; one thread also makes the run reproducible
    t0 = time.perf_counter()
    model, acc = train_digits_classifier(iterations=args.iterations, seed=args.seed)
    command = f"python -m fewstep.eval.classifier --out {args.out} --iterations {args.iterations} --seed {args.seed}"
    weights, _ = save_classifier(model, args.out, acc, command)
    print(f"test accuracy {acc:.4f}; {time.perf_counter() - t0:.1f} s; wrote {weights}", file=sys.stderr)


if __name__ == "__main__":
    main()
