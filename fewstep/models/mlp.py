"""A residual MLP denoiser network for points (the 2-D toys, users' point files)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConditionEmbedding


class _Block(nn.Module):
    def __init__(self, width: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.emb(F.silu(emb))
        return h + self.fc2(F.silu(z))


class PointMLP(nn.Module):
    """``net(x, c_noise, labels) -> raw prediction`` for points of dimension ``dim``.

    Args:
        dim: point dimension (2 for the toys).
        width: hidden width.
        depth: residual blocks; ``features`` returns the hidden state after the first ``depth // 2``.
        num_classes: classes (0 = unconditional); index ``num_classes`` is the null class.
    """

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 4, num_classes: int = 0) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(dim=dim, width=width, depth=depth, num_classes=num_classes)
        self.num_classes = num_classes
        self.embed = ConditionEmbedding(width, num_classes, freq_dim=64)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width, width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        self.feature_channels = width

    def _run(self, x: Tensor, c_noise: Tensor, labels: Tensor | None, stop: int | None) -> Tensor:
        emb = self.embed(c_noise, labels)
        h = self.inp(x)
        for block in self.blocks[:stop]:
            h = block(h, emb)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.out(F.silu(self.out_norm(self._run(x, c_noise, labels, None))))

    def features(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """The hidden state after the first half of the blocks, shape ``(B, width)``."""
        return self._run(x, c_noise, labels, len(self.blocks) // 2)

    def null_cond(self, labels: Tensor) -> Tensor:
        return self.embed.null_cond(labels)
