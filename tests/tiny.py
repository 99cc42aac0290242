"""Tiny networks and batches shared by the method tests (imported as ``from tiny import ...``; pytest puts this
folder on sys.path). Teachers are freshly built, trainable and in train mode: a method must freeze them itself."""
from __future__ import annotations

import torch

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.schedule import DDPMSchedule
from fewstep.methods.base import Batch
from fewstep.models import ClassUNet, PointMLP


def point_teacher(seed: int = 0, num_classes: int = 0, schedule=None, out_std: float | None = None) -> Denoiser:
    """A 2-D MLP teacher; ``out_std`` gives its zero-initialised output layer weights, so that the prediction
    depends on x_t, t and the class."""
    torch.manual_seed(seed)
    net = PointMLP(width=32, depth=2, num_classes=num_classes)
    if out_std is not None:
        torch.nn.init.normal_(net.out.weight, std=out_std)
    return Denoiser(net, schedule or DDPMSchedule(rescale_zero_terminal_snr=True), "v_prediction", (2,),
                    num_classes=num_classes)


def image_teacher(seed: int = 0) -> Denoiser:
    """A class-conditional 8x8 UNet teacher; its output conv (zero at init) gets weights so that the class input
    changes the prediction."""
    torch.manual_seed(seed)
    net = ClassUNet(base_channels=8, num_classes=10, resolution=8)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    return Denoiser(net, DDPMSchedule(rescale_zero_terminal_snr=True), "v_prediction", (1, 8, 8), num_classes=10)


def point_batch(n: int = 64, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 2, generator=g) * 0.5 + 0.3)


def image_batch(n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class TinyExtractor(torch.nn.Module):
    """A stand-in for Inception: uint8 RGB ``(B, 3, H, W)`` -> ``(B, 6)`` features, a fixed random conv, tanh, then
    the spatial mean (``square``: of its square, the local energy, which sees detail)."""

    def __init__(self, square: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.square = square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.float() / 127.5 - 1))
        return (h.pow(2) if self.square else h).mean(dim=(2, 3))
