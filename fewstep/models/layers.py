"""Small building blocks shared by our embedded networks."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the (already schedule-scaled) time input, as in DDPM and diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ConditionEmbedding(nn.Module):
    """Time embedding plus an optional class embedding with a null class (index ``num_classes``) for CFG."""

    def __init__(self, emb_dim: int, num_classes: int = 0, freq_dim: int | None = None) -> None:
        super().__init__()
        self.freq_dim = freq_dim or emb_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

    def forward(self, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(c_noise, self.freq_dim))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((c_noise.shape[0],), self.num_classes, device=c_noise.device, dtype=torch.long)
            emb = emb + self.class_emb(labels.long())
        return emb

    def null_cond(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, self.num_classes)
