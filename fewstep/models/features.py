"""Frozen feature networks for ADD's discriminator (Sauer et al. 2023, sec. 3.2; StyleGAN-T's projected discriminator).

A feature network ``F`` maps a batch of clean samples to

* ``layers``: the features ``F_k(x)`` of several of its layers, each ``(B, C, H, W)`` (maps, ViT tokens on their grid)
  or ``(B, C)`` (vectors); a light trainable head sits on each (:class:`fewstep.models.discriminators.ADDDiscriminator`);
* ``pooled``: one ``(B, D)`` vector per sample, the image embedding ``c_img`` the heads are projected on.

Its weights never train (``requires_grad`` is off and it lives outside every player), but it is differentiable: the
generator's adversarial loss backpropagates through it into the student's samples.

* :class:`DigitsFeatures` -- the embedded digits classifier (:mod:`fewstep.eval.classifier`): its three conv layers
  and its penultimate layer, read with forward hooks (:func:`multi_features`); ``pooled`` is the penultimate
  activation (the feature of digits FID).
* :class:`TeacherFeatures` -- the teacher's own encoder, ``Denoiser.features`` at a fixed small ``t`` on the clean
  input, plus the intermediate encoder blocks of our embedded UNet/MLP; works for any data the teacher works on,
  2-D points included.
* :class:`RandomFeatures` -- a fixed, randomly initialised MLP for points (a control; see the ADD config's help).
* :class:`TimmFeatures` -- DINOv2 / ViT from :mod:`timm` with weights from a local file (nothing is downloaded).
* :class:`DecodedFeatures` -- for latent teachers (SD, SDXL, ...): the pixel networks (``digits``, ``timm``) read
  the teacher's VAE decoding of the latents, with gradient through the frozen decoder.

:func:`build_feature_network` picks one by name.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

FEATURE_NETWORKS = ("digits", "teacher", "random", "timm")
DIGITS_SHAPES = ((1, 8, 8), (1, 16, 16))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# Reading several layers of a network with forward hooks
# ----------------------------------------------------------------------------------------------------------------
@contextmanager
def record_outputs(modules: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Within the block, ``out[i]`` holds the latest output of ``modules[i]`` (forward hooks, removed on exit)."""
    out: list[Tensor | None] = [None] * len(modules)

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def multi_features(model: nn.Module, names: Sequence[str], run: Callable[[], Tensor]) -> tuple[list[Tensor], Tensor]:
    """The outputs of ``model``'s submodules ``names`` (dotted paths, e.g. ``"conv2"``, ``"blocks.3"``) during
    ``run()``, and ``run()``'s own result.

    Args:
        model: the network whose submodules are read.
        names: submodule names as in ``model.named_modules()``.
        run: a call that runs (part of) ``model`` and returns a tensor.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no submodules {missing}")
    with record_outputs([modules[n] for n in names]) as out:
        result = run()
    not_run = [n for n, o in zip(names, out) if o is None]
    if not_run:
        raise RuntimeError(f"submodules {not_run} of {type(model).__name__} did not run")
    return list(out), result  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Feature networks
# ----------------------------------------------------------------------------------------------------------------
class FeatureNetwork(nn.Module):
    """Base class: ``forward(x) -> (layers, pooled)``; frozen and in eval mode whatever ``train()`` is called with."""

    #: a short name for logs and errors
    kind: str = "features"

    def freeze(self) -> "FeatureNetwork":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "FeatureNetwork":  # always eval: no dropout, no batch-norm updates
        return super().train(False)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def shapes(self, sample_shape: Sequence[int]) -> tuple[list[tuple[int, ...]], int]:
        """The per-sample shapes of ``layers`` and the width of ``pooled`` for inputs of ``sample_shape``."""
        device = next(iter(self.parameters()), torch.empty(0)).device
        layers, pooled = self(torch.zeros((2, *sample_shape), device=device))
        return [tuple(f.shape[1:]) for f in layers], int(pooled.shape[1])


class DigitsFeatures(FeatureNetwork):
    """The embedded digits classifier as a feature network: ``conv1`` (32 x 8 x 8), ``conv2`` (64 x 8 x 8), ``conv3``
    (64 x 4 x 4) and ``fc`` (64) pre-activations; ``pooled`` = the penultimate activation ``silu(fc)``.

    Args:
        classifier: a :class:`~fewstep.eval.classifier.DigitsClassifier` (default: the shipped one, or the one at
            ``weights``).
        weights: path of classifier weights saved by ``save_classifier`` (None: the shipped ones).
        layers: which of its modules to read.
    """

    kind = "digits"
    LAYERS = ("conv1", "conv2", "conv3", "fc")

    def __init__(self, classifier: nn.Module | None = None, weights: str | Path | None = None,
                 layers: Sequence[str] = LAYERS) -> None:
        super().__init__()
        if classifier is None:
            from ..eval.classifier import load_digits_classifier

            classifier = load_digits_classifier(weights)
        self.classifier = classifier
        self.layers = tuple(layers)
        self.freeze()

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return multi_features(self.classifier, self.layers, lambda: self.classifier.features(x))


def _encoder_layers(net: nn.Module) -> list[str]:
    """Intermediate encoder outputs of our embedded networks that ``features`` runs through (besides its output)."""
    from .mlp import PointMLP
    from .unet import ClassUNet, ResBlock

    if isinstance(net, ClassUNet):  # the last residual block of every resolution level
        names, last = [], None
        for i, layer in enumerate(net.down):
            if isinstance(layer, ResBlock):
                last = f"down.{i}"
            elif last is not None:
                names.append(last)
                last = None
        return names + ([last] if last is not None else [])
    if isinstance(net, PointMLP):  # the input projection and every encoder block but the last (= features)
        return ["inp"] + [f"blocks.{i}" for i in range(len(net.blocks) // 2 - 1)]
    return []


class TeacherFeatures(FeatureNetwork):
    """The teacher's encoder at a fixed small time: ``D.features(x, t_feat, null)`` on the clean sample, with the
    intermediate encoder blocks of our embedded networks as extra layers (Lightning's and DMD2's discriminators use the
    same encoder, at the diffused input's own time; ADD's feature network sees clean samples, hence one fixed ``t``).

    ``pooled`` is the last layer averaged over space. The condition is the null class, so the features do not depend on
    the label; the heads' projection brings the label in.

    Args:
        teacher: the frozen teacher denoiser (shared, not copied).
        t_fraction: the fixed time as a share of the schedule's range (0 = ``t_min``); rounded to a whole step on
            DDPM schedules.
    """

    kind = "teacher"

    def __init__(self, teacher: nn.Module, t_fraction: float = 0.02) -> None:
        super().__init__()
        self.denoiser = teacher  # shared, not copied: the teacher is frozen already (and may be large)
        schedule = self.denoiser.schedule
        t = schedule.from_fraction(torch.tensor([float(t_fraction)]))
        self.register_buffer("t_feat", (t.round() if schedule.kind == "ddpm" else t).float(), persistent=False)
        self.layers = _encoder_layers(self.denoiser.net)
        self.freeze()

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        t = self.t_feat.to(x.device).expand(x.shape[0])
        cond = None
        if getattr(self.denoiser, "num_classes", 0) > 0:
            cond = torch.full((x.shape[0],), self.denoiser.num_classes, dtype=torch.long, device=x.device)
        inner, last = multi_features(self.denoiser.net, self.layers, lambda: self.denoiser.features(x, t, cond))
        pooled = last.flatten(2).mean(2) if last.ndim > 2 else last
        return [*inner, last], pooled


class RandomFeatures(FeatureNetwork):
    """A fixed random MLP ``dim -> width -> ... -> width`` with LeakyReLU: every layer's activation is a feature.

    A control for points: a discriminator whose frozen part knows nothing about the data.

    Args:
        dim: input dimension.
        width: hidden width.
        depth: hidden layers (= feature layers).
        seed: seed of the initialisation (the weights are a function of it).
    """

    kind = "random"

    def __init__(self, dim: int, width: int = 128, depth: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList()
        d = dim
        for _ in range(depth):
            lin = nn.Linear(d, width)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(width, d, generator=g) * math.sqrt(2.0 / d))
                lin.bias.copy_(torch.randn(width, generator=g) * 0.5)
            self.layers.append(lin)
            d = width
        self.freeze()

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        h, out = x.flatten(1), []
        for lin in self.layers:
            h = F.leaky_relu(lin(h), 0.2)
            out.append(h)
        return out, h


class TimmFeatures(FeatureNetwork):
    """DINOv2 / ViT from ``timm`` with weights from a local file: the tokens of ``num_layers`` evenly spaced blocks
    (prefix tokens dropped, patch tokens on their grid as ``(B, C, h, w)`` maps, as StyleGAN-T's heads read them) and
    the pre-logits embedding (the class token after the final norm) as ``pooled``.

    Inputs in ``[-1, 1]`` are mapped to ``[0, 1]``, grey images repeated to RGB, resized to ``resolution`` (bilinear,
    antialiased) and normalised with the ImageNet mean/std.

    Args:
        model_name: a timm model name, e.g. ``vit_small_patch14_dinov2.lvd142m`` or ``vit_small_patch16_224``.
        weights: a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict of that model.
        num_layers: how many blocks to read.
        resolution: the input side the ViT sees (a multiple of its patch size).
    """

    kind = "timm"

    def __init__(self, model_name: str, weights: str | Path | None, num_layers: int = 4, resolution: int = 224) -> None:
        super().__init__()
        problems = []
        if weights is None:
            problems.append("feature_weights: the path of a local weights file (.safetensors or .pth) of "
                            f"timm model {model_name!r}")
        elif not Path(weights).is_file():
            problems.append(f"the weights file {weights} (not found)")
        try:
            import timm
        except ImportError:
            timm = None
            problems.append("the timm package (pip install timm)")
        if problems:
            raise UserError(f"feature network 'timm' ({model_name}) needs " + " and ".join(problems))
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
        except TypeError:  # an older timm without dynamic_img_size
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        except Exception as e:  # an unknown model name
            raise UserError(f"timm cannot build model {model_name!r} ({str(e).splitlines()[0]})") from None
        state = _load_state_dict(Path(weights))  # type: ignore[arg-type]
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # classifier heads are not used
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"{weights} does not hold weights of timm model {model_name!r}: "
                            f"{str(e).splitlines()[0]}") from None
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise UserError(f"timm model {model_name!r} is not a ViT (it has no .blocks); use a ViT or DINOv2 model")
        self.model = model
        n = len(blocks)
        k = max(1, min(int(num_layers), n))
        self.block_names = [f"blocks.{round(i * (n - 1) / max(k - 1, 1)) if k > 1 else n - 1}" for i in range(k)]
        self.resolution = int(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"feature network 'timm' takes grey or RGB images (B, 1|3, H, W), got {tuple(x.shape)}")
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        x = self._prepare(x)
        tokens, feats = multi_features(self.model, self.block_names, lambda: self.model.forward_features(x))
        pooled = self.model.forward_head(feats, pre_logits=True)
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        maps = []
        for tok in tokens:
            patches = tok[:, prefix:]
            side = int(round(math.sqrt(patches.shape[1])))
            assert side * side == patches.shape[1], "ViT patch tokens do not form a square grid"
            maps.append(patches.transpose(1, 2).reshape(tok.shape[0], tok.shape[-1], side, side))
        return maps, pooled


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights from {path} ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model", "teacher"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    return state


class DecodedFeatures(FeatureNetwork):
    """A pixel feature network on a latent teacher's samples: latents are decoded by the teacher's frozen VAE (with
    gradient, so the adversarial loss reaches the student through the decoder, as in ADD on SDXL) and ``inner`` reads
    the images.

    Args:
        inner: the feature network on images of ``image_shape``.
        components: the latent teacher's :class:`~fewstep.models.hf.Components` (its ``vae`` and scaling).
        image_shape: the decoded image's shape ``(C, H, W)``.
    """

    kind = "decoded"

    def __init__(self, inner: FeatureNetwork, components: Any, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.inner = inner
        self.vae = components.vae.eval().requires_grad_(False)  # the teacher's own VAE module, not a copy
        self._components = components
        self.image_shape = tuple(image_shape)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.inner(self._components.decode_with_grad(x))

    @torch.no_grad()
    def shapes(self, sample_shape: Sequence[int]) -> tuple[list[tuple[int, ...]], int]:
        return self.inner.shapes(self.image_shape)


def build_feature_network(
    name: str,
    teacher: nn.Module,
    weights: str | Path | None = None,
    teacher_t: float = 0.02,
    timm_model: str = "vit_small_patch14_dinov2.lvd142m",
    timm_layers: int = 4,
    resolution: int = 224,
    seed: int = 0,
) -> FeatureNetwork:
    """The frozen feature network ``name`` for samples of ``teacher.sample_shape``.

    Args:
        name: ``digits``, ``teacher``, ``random`` or ``timm`` (see the module docstring).
        teacher: the teacher denoiser (its sample shape; the encoder for ``teacher``).
        weights: digits classifier weights (``digits``) or the ViT's weights file (``timm``).
        teacher_t: ``teacher``'s fixed time, as a share of the schedule's range.
        timm_model, timm_layers, resolution: ``timm``'s model name, number of layers read, input side.
        seed: ``random``'s initialisation seed.
    """
    if name in ("digits", "timm") and getattr(teacher, "latent", False):  # pixel networks see decoded latents
        from .hf import image_shape

        inner = build_feature_network(name, _ImageShape(image_shape(teacher)), weights, teacher_t, timm_model,
                                      timm_layers, resolution, seed)
        return DecodedFeatures(inner, teacher.components, image_shape(teacher))
    shape = tuple(teacher.sample_shape)
    if name == "digits":
        if shape not in DIGITS_SHAPES:
            raise UserError(f"feature network 'digits' takes (1, 8, 8) or (1, 16, 16) images, but the teacher makes "
                            f"{shape}; use feature_network: teacher")
        return DigitsFeatures(weights=weights)
    if name == "teacher":
        return TeacherFeatures(teacher, teacher_t)
    if name == "random":
        if len(shape) != 1:
            raise UserError(f"feature network 'random' is for points, but the teacher makes {shape}; "
                            "use feature_network: teacher")
        return RandomFeatures(shape[0], seed=seed)
    if name == "timm":
        if len(shape) != 3:
            raise UserError(f"feature network 'timm' is for images, but the teacher makes {shape}; "
                            "use feature_network: teacher")
        return TimmFeatures(timm_model, weights, timm_layers, resolution)
    raise UserError(f"unknown feature network {name!r}; use one of {', '.join(FEATURE_NETWORKS)}")


class _ImageShape:
    """Stands in for a teacher where only its ``sample_shape`` is read (a latent teacher's decoded images)."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.sample_shape = tuple(shape)


__all__ = [
    "FEATURE_NETWORKS",
    "FeatureNetwork",
    "DigitsFeatures",
    "TeacherFeatures",
    "RandomFeatures",
    "TimmFeatures",
    "build_feature_network",
    "multi_features",
    "record_outputs",
]
