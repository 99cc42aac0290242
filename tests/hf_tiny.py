"""Tiny random diffusers/transformers components, saved as local folders (nothing is downloaded).

Shared by tests/test_hf.py and tests/test_export.py, after diffusers' ``get_dummy_components()``: UNets with
``block_out_channels=(4, 8)``, a 32-wide CLIP text model and a CLIP tokenizer from a vocabulary written here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def write_clip_tokenizer(folder: Path):
    """A byte-level BPE CLIP tokenizer over single characters (no merges beyond one), saved to ``folder``."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to 256 + n
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["th"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    return tok


def clip_text_model(vocab_size: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, hidden_size=32,
                         intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                         pad_token_id=1, vocab_size=vocab_size, max_position_embeddings=16, projection_dim=32,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_vae(latent_channels: int = 4, shift: float | None = None, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=latent_channels,
                         norm_num_groups=2, sample_size=16, scaling_factor=0.5, **kw).eval()


def unet2d(seed: int = 0, prediction_type: str = "epsilon", folder: Path | None = None, channels: int = 3):
    """A pixel-space UNet2DModel pipeline (DDPMPipeline) on ``channels``x8x8 images (1: digits-shaped)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                       layers_per_block=1, norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                          timestep_spacing="trailing")
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def sd_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon"):
    """A text-to-image latent pipeline (StableDiffusionPipeline): UNet2DConditionModel 4x8x8 latents, CLIP, VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = write_clip_tokenizer(folder.parent / (folder.name + "_tok"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
                                layers_per_block=1, norm_num_groups=2, cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                          steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(unet=unet, scheduler=sched, vae=tiny_vae(seed=seed),
                                   text_encoder=clip_text_model(len(tok), seed=seed), tokenizer=tok,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def dit_pipeline(folder: Path, seed: int = 0):
    """A class-conditional latent DiT pipeline (DiTPipeline): 4x8x8 latents, 3 classes, learned sigma."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=2)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=dit, vae=tiny_vae(seed=seed), scheduler=sched, id2label={0: "a", 1: "b", 2: "c"})
    pipe.save_pretrained(folder)
    return pipe


def sd3_pipeline(folder: Path, seed: int = 0):
    """A flow-matching SD3 pipeline: SD3Transformer2DModel on 4x8x8 latents, two CLIPs (no T5), VAE with shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = write_clip_tokenizer(folder.parent / (folder.name + "_tok"))
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                               pooled_projection_dim=64, out_channels=4)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=tiny_vae(shift=0.1, seed=seed),
                                    text_encoder=clip_text_model(len(tok), True, seed), tokenizer=tok,
                                    text_encoder_2=clip_text_model(len(tok), True, seed + 1), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)
    return pipe


def sdxl_pipeline(folder: Path, seed: int = 0):
    """An SDXL-style pipeline: UNet2DConditionModel with "text_time" added conditioning, CLIP + CLIP-with-projection
    (as diffusers' SDXL ``get_dummy_components``), VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = write_clip_tokenizer(folder.parent / (folder.name + "_tok"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8),
                                layers_per_block=1, norm_num_groups=2, attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(unet=unet, scheduler=sched, vae=tiny_vae(seed=seed),
                                     text_encoder=clip_text_model(len(tok), seed=seed), tokenizer=tok,
                                     text_encoder_2=clip_text_model(len(tok), True, seed + 1), tokenizer_2=tok)
    pipe.save_pretrained(folder)
    return pipe


def t5_tokenizer(folder: Path):
    """A T5 tokenizer over single characters (a Unigram model built here, as T5's sentencepiece one is)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"]
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab += [c, "\u2581" + c]
    tk = Tokenizer(models.Unigram([(v, -1.0) for v in vocab], unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                          model_max_length=32)
    tok.save_pretrained(folder)
    return tok, len(vocab)


def flux_pipeline(folder: Path, seed: int = 0):
    """A Flux pipeline: FluxTransformer2DModel (4 latent channels packed 2x2), CLIP + a tiny T5, VAE with shift,
    resolution-dependent (dynamic) shift. FluxPipeline's default size (128 latents) is set in its ``__init__``; tests
    patch it to 8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = write_clip_tokenizer(folder.parent / (folder.name + "_tok"))
    t5tok, t5_vocab = t5_tokenizer(folder.parent / (folder.name + "_t5tok"))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0)).eval()
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32,
                                axes_dims_rope=(2, 2, 4), guidance_embeds=True)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=tiny_vae(shift=0.1, seed=seed),
                        text_encoder=clip_text_model(len(tok), seed=seed), tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5tok)
    pipe.save_pretrained(folder)
    return pipe


def captioned_images(folder: Path, n: int = 8, size: int = 16, caption: str = "a photo of thing {i}",
                     prefix: str = "img") -> Path:
    """``n`` random RGB images ``<prefix><i>.png`` with their captions ``<prefix><i>.txt`` (seeded), in ``folder``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
        (folder / f"{prefix}{i}.txt").write_text(caption.format(i=i))
    return folder


class FakeViT(torch.nn.Module):
    """The slice of timm's VisionTransformer that fewstep's TimmFeatures uses (blocks, forward_features,
    forward_head): a stand-in for DINOv2 where timm or its weights are not installed."""

    num_prefix_tokens = 1

    def __init__(self, dim: int = 12, patch: int = 4, depth: int = 5) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim))
                                            for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)

    def forward_features(self, x):
        tok = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), tok], 1)))

    def forward_head(self, x, pre_logits=False):
        return x[:, 0]


def fake_timm(monkeypatch, folder: Path) -> Path:
    """Make ``import timm`` give a module whose ``create_model`` builds a :class:`FakeViT`, and write that ViT's
    weights to ``folder``; returns the weights file (a recipe's ``feature_weights``)."""
    import sys
    import types

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights = folder / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in FakeViT().state_dict().items()}, str(weights))
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(
        create_model=lambda name, pretrained, num_classes, **kw: FakeViT()))
    return weights
