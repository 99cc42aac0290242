"""A small class-conditional UNet for the embedded image data (8x8 or 16x16 digits, small image folders).

The layout follows the DDPM/ADM UNet in miniature: residual blocks with GroupNorm and a time+class embedding added
after the first convolution, self-attention in the mid block, skip connections. ``features`` returns the mid block's
output (the "bottleneck" DMD2's GAN head and Lightning's discriminator sit on).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import ConditionEmbedding


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ClassUNet(nn.Module):
    """Class-conditional UNet: ``net(x, c_noise, labels) -> raw prediction``; ``labels=None`` is the null class.

    Args:
        in_channels: image channels (1 for digits).
        resolution: image side (must be divisible by ``2 ** (len(channel_mult) - 1)``).
        base_channels: channels at full resolution.
        channel_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        num_classes: classes (0 = unconditional); index ``num_classes`` is the null class used for CFG.
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        resolution: int = 8,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, resolution=resolution, base_channels=base_channels,
            channel_mult=list(channel_mult), num_res_blocks=num_res_blocks, num_classes=num_classes, dropout=dropout,
        )
        emb_dim = base_channels * 4
        self.num_classes = num_classes
        self.embed = ConditionEmbedding(emb_dim, num_classes, freq_dim=base_channels)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        chans = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                chans.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                chans.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = Attention(ch)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + chans.pop(), base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.feature_channels = base_channels * channel_mult[-1]
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each residual block's activations in the backward pass (diffusers' method name)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _block(self, block: ResBlock, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def _encode(self, x: Tensor, c_noise: Tensor, labels: Tensor | None) -> tuple[Tensor, list[Tensor], Tensor]:
        emb = self.embed(c_noise, labels)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = self._block(layer, h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self._block(self.mid2, self.mid_attn(self._block(self.mid1, h, emb)), emb)
        return h, skips, emb

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        h, skips, emb = self._encode(x, c_noise, labels)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = self._block(layer, torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def features(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """The mid block's output, shape ``(B, C, H / 2^(L-1), W / 2^(L-1))``."""
        return self._encode(x, c_noise, labels)[0]

    def null_cond(self, labels: Tensor) -> Tensor:
        return self.embed.null_cond(labels)
