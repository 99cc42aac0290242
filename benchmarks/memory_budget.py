"""The memory budget of each method on SD 1.5 and SDXL UNets: the arithmetic behind the README's GPU recipes.

Nothing is downloaded and nothing is computed on real weights: the UNets are built from their published configs on
PyTorch's ``meta`` device, which gives exact parameter counts, and one forward pass there records the tensors autograd
saves for backward (batch 1, bf16) -- the activation memory of a training pass. Attention-probability matrices are
counted apart: PyTorch's flash / memory-efficient SDPA kernels on a GPU do not keep them.

Per parameter: a frozen weight in bf16 costs 2 bytes; a trained one 16 (fp32 weight 4 + gradient 4 + AdamW's two
moments 8); an EMA copy 4 more. LoRA (``lora_rank``) adapts every Linear and Conv2d (fewstep.models.lora).
Run: ``python benchmarks/memory_budget.py`` (about a minute on a CPU); writes benchmarks/results/memory_budget.json.
"""
from __future__ import annotations

import datetime
import json
import logging
import platform
import sys
from pathlib import Path

import torch
from torch import nn

GB = 1e9  # decimal gigabytes, as GPU memory is sold ("80 GB")

SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SD15 = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
TEXT_ENCODERS = {"sd15": 123.06e6, "sdxl": 123.06e6 + 694.66e6}  # CLIP ViT-L/14 text; + OpenCLIP ViT-bigG/14 text
VAE = 83.65e6
LORA_RANK = 64


def lora_params(net: nn.Module, rank: int) -> int:
    n = 0
    for m in net.modules():
        if isinstance(m, nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            n += rank * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * rank
    return n


def activations(cfg: dict, checkpointing: bool) -> dict[str, float]:
    """GB saved for backward by one training forward (batch 1, bf16): the whole UNet and its encoder + mid block."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    counts = {"total": 0, "attention": 0, "encoder": None}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, nn.Parameter) or (t.requires_grad and t.is_leaf)):
            nb = t.numel() * t.element_size()
            counts["total"] += nb
            if t.ndim >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 1024:
                counts["attention"] += nb
        return t

    def after_mid(*_: object) -> None:
        counts["encoder"] = counts["total"] - counts["attention"]

    unet.mid_block.register_forward_hook(after_mid)
    # the largest unit gradient checkpointing recomputes at once (a ResNet block or a transformer block)
    counts["block"], starts = 0, {}
    for m in unet.modules():
        if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):
            m.register_forward_pre_hook(lambda mod, *_: starts.__setitem__(id(mod), counts["total"] - counts["attention"]))
            m.register_forward_hook(lambda mod, *_: counts.__setitem__("block", max(
                counts["block"], counts["total"] - counts["attention"] - starts[id(mod)])))
    res = cfg["sample_size"]
    x = torch.randn(1, 4, res, res, device="meta", dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], device="meta", dtype=torch.bfloat16)
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 1280, device="meta", dtype=torch.bfloat16),
                                   "time_ids": torch.zeros(1, 6, device="meta", dtype=torch.bfloat16)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500.0], device="meta"), ctx, **kw)
    return {"unet": (counts["total"] - counts["attention"]) / GB, "encoder": counts["encoder"] / GB,
            "attention_matrices": counts["attention"] / GB, "largest_block": counts["block"] / GB}


def budget(name: str, cfg: dict) -> list[dict]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    P = sum(p.numel() for p in unet.parameters())
    enc = sum(p.numel() for m in (unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block)
              for p in m.parameters()) + sum(p.numel() for p in getattr(unet, "add_embedding", nn.Identity()).parameters())
    L = lora_params(unet, LORA_RANK)
    act, act_gc = activations(cfg, False), activations(cfg, True)
    frozen_extra = (TEXT_ENCODERS[name] + VAE) * 2  # bf16; prompts are encoded once and cached, so these may go
    head = 0.02 * GB  # DMD2's GAN head / ADD's heads: a few million parameters at 16 B

    def row(method: str, variant: str, states: float, passes: float, note: str) -> dict:
        """``passes``: full-UNet activation sets held at once in the heaviest update, as a multiple of one."""
        per_sample = passes * act["unet"]
        # checkpointed: the blocks' inputs, plus the one block being recomputed in backward (its full activations)
        per_sample_gc = passes * act_gc["unet"] + act["largest_block"]
        return {"data": name, "method": method, "variant": variant, "unet_params": P, "lora_params": L,
                "states_gb": round(states / GB, 1), "encoders_vae_gb": round(frozen_extra / GB, 1),
                "activations_gb_per_sample": round(per_sample, 1),
                "activations_gb_per_sample_checkpointed": round(per_sample_gc, 1),
                "batch_per_80gb": int(max(0, 80 - 2 - (states + frozen_extra) / GB) // per_sample),
                "batch_per_80gb_checkpointed": int(max(0, 80 - 2 - (states + frozen_extra) / GB) // per_sample_gc),
                "note": note}

    f = act["encoder"] / act["unet"]  # share of a pass's activations in the encoder + mid block
    rows = [
        row("dmd2", "full", 2 * P + 16 * P + 16 * P + head, 1 + 2 * f,
            "teacher bf16 + generator and fake score trained in full; guidance update: fake score fwd/bwd + head on "
            "the real and fake encoder features"),
        row("dmd2", f"lora{LORA_RANK}", 2 * P + 2 * 16 * L + head, 1 + 2 * f,
            "generator and fake score are LoRA adapters on the teacher's own bf16 weights (held once)"),
        row("add", "full", 2 * P + 16 * P + 4 * P + head, 1 + f,
            "student in full + EMA; heads on the frozen teacher's encoder (feature_network: teacher), whose pass on "
            "the student's sample keeps its activations for the generator's backward"),
        row("add", f"lora{LORA_RANK}", 2 * P + 16 * L + 4 * L + head, 1 + f,
            "LoRA student (its EMA shares the frozen base)"),
        row("lightning", "full", 2 * P + 2 * P + 16 * P + 16 * enc, 1 + 4 * f,
            "full phase: teacher and previous-stage student bf16, student in full, discriminator = trained copy of "
            "the encoder + mid block; its update runs 4 encoder passes (conditional: x_t and x_t-ns, real and fake)"),
        row("lightning", "full, frozen backbone", 2 * P + 2 * P + 16 * P + 2 * enc + head, 1 + 4 * f,
            "lr_discriminator: 0 -- the discriminator's encoder copy frozen (bf16), only its heads train"),
        row("lightning", "lora phases", 2 * P + 2 * P + 16 * L + 16 * enc, 1 + 4 * f,
            "LoRA phases only (the full phase is the peak)"),
        row("disback", "full (dmd2)", 2 * P + 2 * P + 16 * P + 16 * P + head, 1 + 2 * f,
            "DMD2 + the frozen target copy the path is loaded into; recording (before) trains one full copy"),
        row("disback", f"lora{LORA_RANK} (dmd2)", 2 * P + 2 * P + 2 * P + 2 * 16 * L + head, 1 + 2 * f,
            "DMD2 LoRA + the frozen target copy + the fake score's own base (unshared when D^(N) is loaded)"),
        row("disback", "recording", 4 * P + 4 * P + 4 * P + 16 * P, 2.0,
            "before the loop's bf16 cast: teacher, target copy and initial generator in fp32, D_deg trained in full, "
            "fp32 activations (x2 of bf16) without gradient checkpointing"),
    ]
    for r in rows:
        r.update(activations_unet_gb=round(act["unet"], 2), activations_encoder_gb=round(act["encoder"], 2),
                 attention_matrices_gb=round(act["attention_matrices"], 2),
                 largest_block_gb=round(act["largest_block"], 2), encoder_params=enc)
    return rows


def main() -> None:
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    rows = budget("sd15", SD15) + budget("sdxl", SDXL)
    for r in rows:
        print(f"{r['data']:5s} {r['method']:9s} {r['variant']:16s} states {r['states_gb']:6.1f} GB  "
              f"act/sample {r['activations_gb_per_sample']:5.1f} GB ({r['activations_gb_per_sample_checkpointed']:4.1f} "
              f"checkpointed)  batch/80GB {r['batch_per_80gb']:3d} ({r['batch_per_80gb_checkpointed']:3d})")
    out = Path(__file__).parent / "results" / "memory_budget.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"command": "python benchmarks/memory_budget.py", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, meta device (no compute)", "torch": torch.__version__,
            "lora_rank": LORA_RANK, "resolution": {"sd15": 512, "sdxl": 1024}}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
