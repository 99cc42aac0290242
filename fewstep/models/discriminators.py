"""Discriminator heads that sit on a denoiser's ``features(x_t, t, cond)`` (DMD2's GAN classifier, Lightning's D)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FeatureHead(nn.Module):
    """A small classifier on encoder features: one logit per sample.

    Image features ``(B, C, H, W)``: conv 4x4 stride 2 (while the map is larger than 2x2) -> GroupNorm -> SiLU, then
    a 1x1 conv to one channel, averaged over space -- DMD2's ``cls_pred_branch`` in miniature. Vector features
    ``(B, C)`` (our MLP): a two-layer MLP.

    Args:
        channels: channels of the features.
        spatial: the feature map's side (0 for vector features).
        width: hidden channels.
    """

    def __init__(self, channels: int, spatial: int = 0, width: int = 64) -> None:
        super().__init__()
        if spatial == 0:
            self.body = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
            self.out = nn.Linear(width, 1)
        else:
            layers: list[nn.Module] = []
            ch, size = channels, spatial
            while size > 2:
                layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
                ch, size = width, size // 2
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.SiLU()]
            self.body = nn.Sequential(*layers)
            self.out = nn.Conv2d(width, 1, 1)
        self.config = {"channels": channels, "spatial": spatial, "width": width}

    def forward(self, features: Tensor) -> Tensor:
        logits = self.out(self.body(features))
        return logits.flatten(1).mean(1)


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator side of the non-saturating logistic GAN: ``softplus(-h(real)) + softplus(h(fake))``."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator side: ``softplus(-h(fake))``."""
    return F.softplus(-fake_logits).mean()
