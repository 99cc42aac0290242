"""Discriminator heads: on a denoiser's ``features(x_t, t, cond)`` (DMD2's GAN classifier, Lightning's D) and on a frozen
feature network with projection conditioning, hinge loss and R1 on the heads' inputs (ADD)."""
from __future__ import annotations

from typing import Any

import torch
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


# ----------------------------------------------------------------------------------------------------------------
# ADD: light heads on a frozen feature network, projection conditioning, hinge loss, R1 on the heads' inputs
# ----------------------------------------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """One light discriminator head ``D_k`` on features ``F_k`` of a frozen network (ADD sec. 3.2, after StyleGAN-T).

    ``phi``: 1x1 conv -> GroupNorm -> LeakyReLU(0.2) -> 3x3 conv -> GroupNorm -> LeakyReLU(0.2) on maps
    ``(B, C, H, W)`` (linear layers and one-group GroupNorm, i.e. LayerNorm, on vectors ``(B, C)``), averaged over space to ``phi(f)`` of width ``width``. The
    output is the projection discriminator (Miyato & Koyama 2018, eq. 3)

        ``D_k(f) = w^T phi(f) + b + <e(c) + Q c_text + P c_img, phi(f)> / sqrt(width)``

    with ``e`` a learned class embedding (absent for an unconditional teacher), ``Q`` a learned linear map of the
    L2-normalised text embedding ``c_text`` (:func:`text_embedding`; absent with ``text_dim = 0``) and ``P`` one of
    the L2-normalised image embedding ``c_img`` (absent with ``img_dim = 0``; a zero ``c_img`` -- ADD's ``s = T`` --
    adds nothing). The ``1 / sqrt(width)`` is StyleGAN-T's ``cmap`` scaling. GroupNorm (no batch statistics) keeps each
    sample's logit a function of that sample alone, so R1 is a per-sample gradient.

    Args:
        channels: channels of the features.
        spatial: 0 for vector features, else the map's side.
        width: hidden width.
        num_classes: classes of the condition (0 = none).
        img_dim: width of ``c_img`` (0 = no image conditioning).
        text_dim: width of ``c_text`` (0 = no text conditioning).
    """

    def __init__(self, channels: int, spatial: int = 0, width: int = 64, num_classes: int = 0, img_dim: int = 0,
                 text_dim: int = 0):
        super().__init__()
        if spatial == 0:  # one group: a LayerNorm over the hidden units
            self.phi = nn.Sequential(nn.Linear(channels, width), nn.GroupNorm(1, width), nn.LeakyReLU(0.2),
                                     nn.Linear(width, width), nn.GroupNorm(1, width), nn.LeakyReLU(0.2))
        else:
            groups = max(1, min(8, width // 8))
            self.phi = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GroupNorm(groups, width), nn.LeakyReLU(0.2),
                                     nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width),
                                     nn.LeakyReLU(0.2))
        self.out = nn.Linear(width, 1)
        self.class_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None  # + the null class
        self.img_proj = nn.Linear(img_dim, width, bias=False) if img_dim > 0 else None
        self.text_proj = nn.Linear(text_dim, width, bias=False) if text_dim > 0 else None
        self.width = width
        self.config = {"channels": channels, "spatial": spatial, "width": width, "num_classes": num_classes,
                       "img_dim": img_dim, "text_dim": text_dim}

    def forward(self, features: Tensor, labels: Tensor | None = None, c_img: Tensor | None = None,
                c_text: Tensor | None = None) -> Tensor:
        """One logit per sample, ``(B,)``."""
        h = self.phi(features)
        if h.ndim > 2:
            h = h.flatten(2).mean(2)
        logits = self.out(h).squeeze(1)
        cmap = None
        if self.class_embed is not None and labels is not None:
            cmap = self.class_embed(labels.long())
        if self.img_proj is not None and c_img is not None:
            proj = self.img_proj(F.normalize(c_img.to(h.dtype), dim=1))
            cmap = proj if cmap is None else cmap + proj
        if self.text_proj is not None and c_text is not None:
            proj = self.text_proj(F.normalize(c_text.to(h.dtype), dim=1))
            cmap = proj if cmap is None else cmap + proj
        if cmap is not None:
            logits = logits + (cmap * h).sum(1) / self.width**0.5
        return logits


class ADDDiscriminator(nn.Module):
    """ADD's trainable discriminator: one :class:`ProjectionHead` per feature layer ``F_k``; the frozen feature network
    stays outside (it is not trained and not saved with the heads).

    ``forward`` is the discriminator's whole loss (DDP synchronises only through forward):
    ``sum_k [hinge_d(D_k(F_k(x0)), D_k(F_k(x_hat)))] + gamma * sum_k R1_k`` (ADD eq. 3) with R1 taken w.r.t. the heads'
    input features of real data (:func:`r1_penalty`).

    Args:
        shapes: per-sample shapes of the feature layers, ``(C, H, W)`` or ``(C,)``.
        width: the heads' hidden width.
        num_classes: classes of the condition (0 = unconditional).
        img_dim: width of the image embedding ``c_img`` (0 = no image conditioning).
        text_dim: width of the text embedding ``c_text`` (0 = no text conditioning).
    """

    def __init__(self, shapes: list[tuple[int, ...]], width: int = 64, num_classes: int = 0, img_dim: int = 0,
                 text_dim: int = 0):
        super().__init__()
        self.heads = nn.ModuleList(
            ProjectionHead(s[0], s[-1] if len(s) == 3 else 0, width, num_classes, img_dim, text_dim) for s in shapes)

    def logits(self, features: list[Tensor], labels: Tensor | None = None, c_img: Tensor | None = None,
               c_text: Tensor | None = None) -> list[Tensor]:
        """``[D_k(F_k)]``, each ``(B,)``."""
        assert len(features) == len(self.heads), (len(features), len(self.heads))
        return [head(f, labels, c_img, c_text) for head, f in zip(self.heads, features)]

    def forward(
        self,
        real_features: list[Tensor],
        fake_features: list[Tensor],
        labels: Tensor | None = None,
        c_img: Tensor | None = None,
        r1_gamma: float = 0.0,
        c_text: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator loss and its parts (``hinge``, ``r1``, mean ``real_logit`` / ``fake_logit``); a real
        sample and the fake one made from it share ``labels``, ``c_img`` and ``c_text``."""
        r1_on = r1_gamma > 0 and torch.is_grad_enabled()
        real_in = [f.detach().requires_grad_(r1_on) for f in real_features]
        real = self.logits(real_in, labels, c_img, c_text)
        fake = self.logits([f.detach() for f in fake_features], labels, c_img, c_text)
        hinge = sum(hinge_d_loss(r, f) for r, f in zip(real, fake))
        loss = hinge
        stats = {"hinge": hinge.detach(), "real_logit": torch.stack([r.detach().mean() for r in real]).mean(),
                 "fake_logit": torch.stack([f.detach().mean() for f in fake]).mean()}
        if r1_on:
            r1 = sum(r1_penalty(r, f) for r, f in zip(real, real_in))
            loss = loss + r1_gamma * r1
            stats["r1"] = r1.detach()
        return loss, stats


def text_embedding(cond: Any) -> Tensor | None:
    """``c_text`` of a prompt condition (a dict of prompt embeddings, :meth:`Components.encode_prompts`), ``(B, D)``
    in float32: the pooled embedding where the pipeline has one (SDXL's ``text_embeds``, SD3/Flux's
    ``pooled_projections``), else the mean of the token embeddings ``encoder_hidden_states`` (SD 1.x/2.x). None for
    class labels or no condition."""
    if not isinstance(cond, dict):
        return None
    for key in ("text_embeds", "pooled_projections"):
        if key in cond:
            return cond[key].float().flatten(1)
    return cond["encoder_hidden_states"].float().mean(1)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator side of the hinge loss (Lim & Ye 2017): ``mean max(0, 1 - D(real)) + mean max(0, 1 + D(fake))``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Generator side of the hinge loss: ``-mean D(fake)`` (ADD eq. 2)."""
    return -fake_logits.mean()


def r1_penalty(logits: Tensor, inputs: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ``mean_b || d D(inputs_b) / d inputs_b ||^2``, differentiable (create_graph).

    ``inputs`` must require grad and each ``logits[b]`` depend on ``inputs[b]`` only (no batch statistics), so the
    gradient of ``logits.sum()`` holds every sample's own gradient. ADD takes it w.r.t. each head's input features.
    """
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
