"""CLIP score for text-to-image students: how well images match their prompts (Hessel et al. 2021).

``CLIP score = 100 * mean_i max(cos(E_img(x_i), E_txt(p_i)), 0)`` -- torchmetrics' ``CLIPScore`` definition, the
number the distillation papers report on COCO prompts (ADD and DMD2 with OpenCLIP ViT-g/14; torchmetrics' default is
OpenAI's ViT-L/14). The model is a transformers ``CLIPModel`` folder read from disk, never downloaded: give it by
argument, by ``$FEWSTEP_CLIP_MODEL``, or at ``~/.cache/fewstep/clip-vit-large-patch14``. Any CLIP checkpoint in
transformers' format works (OpenAI's ViT-L/14, LAION's ViT-g/14 ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``); scores
are comparable only between runs that use the same one.

Images are preprocessed as CLIP's image processor does: bicubic resize of the short side to the model's input size,
centre crop, and normalisation with the processor's mean/std (``preprocessor_config.json`` when the folder has one,
else OpenAI's constants).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

CLIP_ENV = "FEWSTEP_CLIP_MODEL"
CLIP_DEFAULT_NAME = "clip-vit-large-patch14"
CLIP_HUB_ID = "openai/clip-vit-large-patch14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def default_clip_path() -> Path:
    """``~/.cache/fewstep/clip-vit-large-patch14``."""
    return Path.home() / ".cache" / "fewstep" / CLIP_DEFAULT_NAME


def resolve_clip_path(clip_model: str | os.PathLike | None = None) -> Path:
    """The CLIP folder: the argument, else ``$FEWSTEP_CLIP_MODEL``, else the cache path; a one-line ``UserError``
    naming what to put where when it is not a transformers CLIP folder."""
    from .inception import locate

    path, origin = locate(clip_model, "clip_model", CLIP_ENV, default_clip_path())
    if not (path / "config.json").is_file():
        raise UserError(
            f"CLIP weights not found at {path} ({origin}); put a transformers CLIP model folder there (config.json, "
            f"model.safetensors and the tokenizer files, e.g. `huggingface-cli download {CLIP_HUB_ID} --local-dir "
            f"{path}`), set {CLIP_ENV}=DIR or pass clip_model"
        )
    return path


class CLIP:
    """A CLIP model, its tokenizer and its image preprocessing constants."""

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)

    @property
    def max_length(self) -> int:
        cfg = getattr(self.model.config, "text_config", None)
        return int(getattr(cfg, "max_position_embeddings", 77))

    def preprocess(self, images: Tensor) -> Tensor:
        """Images ``(N, 1 or 3, H, W)`` in ``[-1, 1]`` -> CLIP's normalised ``(N, 3, S, S)``."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            size = (max(s, round(h * scale)), max(s, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (x.shape[-2] - s) // 2, (x.shape[-1] - s) // 2
            x = x[..., top : top + s, left : left + s]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], device: Any) -> Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                    attention_mask=tok["attention_mask"].to(device)))


def _pooled(out: Any) -> Tensor:
    """transformers 4 returns the projected embedding, transformers 5 an output whose ``pooler_output`` it is."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip(clip_model: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> CLIP:
    """Load a transformers CLIP folder (see :func:`resolve_clip_path` for where it is looked for)."""
    path = resolve_clip_path(clip_model)
    try:
        from transformers import AutoTokenizer, CLIPModel
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise UserError(f"CLIP score needs transformers ({e}); pip install transformers") from None
    try:
        model = CLIPModel.from_pretrained(str(path)).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a complete transformers CLIP folder ({first}); it needs config.json, the "
                        f"weights and the tokenizer files of a CLIPModel such as {CLIP_HUB_ID}") from None
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return CLIP(model, tokenizer, model.config.vision_config.image_size, mean, std)


@torch.no_grad()
def clip_score(
    images: Tensor | np.ndarray,
    prompts: Sequence[str],
    clip_model: str | os.PathLike | CLIP | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    per_image: bool = False,
) -> float | Tensor:
    """CLIP score of ``images`` against their ``prompts`` (one prompt per image).

    Args:
        images: generated images ``(N, 1 or 3, H, W)`` in ``[-1, 1]`` (decoded from latents for latent teachers).
        prompts: the N prompts they were generated from.
        clip_model: a CLIP folder (see :func:`resolve_clip_path`) or a loaded :class:`CLIP`.
        batch_size: images per forward pass.
        device: where CLIP runs.
        per_image: return the ``(N,)`` scores instead of their mean.

    Returns:
        ``100 * mean max(cos, 0)`` (a float), or the per-image scores.
    """
    x = torch.as_tensor(images).detach().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"CLIP score takes images (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(x) or len(x) == 0:
        raise UserError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(x)} images")
    clip = clip_model if isinstance(clip_model, CLIP) else load_clip(clip_model, device)
    scores = []
    for i in range(0, len(x), batch_size):
        img = F.normalize(clip.image_embeddings(x[i : i + batch_size].to(device)).float(), dim=-1)
        txt = F.normalize(clip.text_embeddings(prompts[i : i + batch_size], device).float(), dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp_min(0).cpu())
    s = torch.cat(scores)
    return s if per_image else float(s.mean())
