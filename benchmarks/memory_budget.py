"""The memory and disk budget of every shipped SD 1.5 / SDXL recipe, phase by phase: the arithmetic behind the
README's GPU recipes (its tables are generated from this script's JSON, and tests/test_recipes.py holds the recipes
to it).

Nothing is downloaded and nothing is computed on real weights: the UNets are built from their published configs on
PyTorch's ``meta`` device, which gives exact parameter counts, and one forward pass there records the tensors autograd
saves for backward (batch 1, bf16) -- the activation memory of a training pass. Attention-probability matrices are
counted apart: PyTorch's flash / memory-efficient SDPA kernels on a GPU do not keep them.

Each recipe (``configs/sd15_*.yaml``, ``configs/sdxl_*.yaml``) is read through its method's config class (so absent
fields take their defaults) and planned from its fields -- ``lora_rank``, ``lora_players``, ``ema_decay``, ``gan``,
DMD2's ``fake_score`` / ``fake_step_rank`` (one LoRA adapter per student step on the fake score),
``lr_discriminator``, DisBack's ``base`` and ``record_*`` -- into the phases it runs. A phase counts everything it
holds on the GPU, by what the training loop does with it (fewstep/train/loop.py, memory.py):

* a frozen weight nobody's optimizer holds: 2 B (bf16 under mixed precision);
* a trained weight: 16 B (fp32 weight 4 + gradient 4 + AdamW's two moments 8);
* a weight an optimizer holds but that does not train in this phase (Lightning's LoRA phases: the student's base
  weights; its full phases: the switched-off adapters): 4 B (fp32, no gradient, no AdamW state);
* an EMA copy: 4 B per parameter (a LoRA player's EMA shares the frozen base);
* LoRA (``lora_rank``) adapts every Linear and Conv2d (fewstep.models.lora); the GAN / discriminator heads are a few
  million parameters (``HEAD_PARAMS``);
* the text encoders and the VAE in bf16, and ``ALLOWANCE_GB`` for the CUDA context and workspaces;
* activations of the config's batch with gradient checkpointing (the recipes all use it); ADD's pixel features and
  pixel-space distillation add a VAE decode with gradient (checkpointed) per sample.

A checkpoint holds each player's module state (trained and optimizer-held weights in fp32, frozen ones in bf16),
AdamW's moments of the trained parameters and the EMA; the disk a run needs is ``keep_checkpoints + 1`` of them (one
being written) plus what the method writes besides (DisBack's path: N fp32 UNets; Lightning's finished stages) and
the exported students.

Run: ``python benchmarks/memory_budget.py`` (about a minute on a CPU); writes benchmarks/results/memory_budget.json.
``--readme`` also rewrites the README's generated tables (between the ``memory_budget`` markers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

GB = 1e9  # decimal gigabytes, as GPU memory is sold ("80 GB")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory_budget.json"
README = ROOT / "README.md"

SDXL = dict(sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SD15 = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
UNETS = {"sd15": SD15, "sdxl": SDXL}
TEXT_ENCODERS = {"sd15": 123.06e6, "sdxl": 123.06e6 + 694.66e6}  # CLIP ViT-L/14 text; + OpenCLIP ViT-bigG/14 text
VAE = 83.65e6
LORA_RANK = 64  # the rank of the README's "LoRA r = 64" line
HEAD_PARAMS = 1.25e6  # DMD2's GAN head, ADD's heads, Lightning's two heads: ~1.2 M parameters (0.02 GB at 16 B)
TIMM_PARAMS = {"small": 22.1e6, "base": 86.6e6, "large": 304.4e6, "giant": 1136e6}  # DINOv2 ViTs (ADD, timm)
ALLOWANCE_GB = 2.0  # CUDA context and kernel workspaces
GPU_GB = 80.0  # every recipe claims one 80 GB GPU
RECIPES = ("sd15_dmd2", "sdxl_dmd2", "sd15_add", "sdxl_add", "sd15_lightning", "sdxl_lightning", "sd15_disback",
           "sdxl_disback")
#: alternatives the README quotes beside the recipes: (recipe, variant, config fields changed)
VARIANTS = (("sdxl_dmd2", "both players in full", {"lora_rank": None}),
            ("sdxl_dmd2", "both players LoRA", {"lora_players": ["generator", "fake_score"]}),
            ("sdxl_lightning", "trained backbone", {"lr_discriminator": 1e-5}),
            ("sdxl_add", "student in full", {"lora_rank": None}))

# bytes per parameter, by what the loop does with it
FROZEN, TRAINED, HELD, EMA = 2, 16, 4, 4


# ----------------------------------------------------------------------------------------------------------------
# The networks
# ----------------------------------------------------------------------------------------------------------------
def build_unet(family: str) -> nn.Module:
    """The family's UNet on the meta device (exact parameter counts, no memory)."""
    from diffusers import UNet2DConditionModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with torch.device("meta"):
        return UNet2DConditionModel(**UNETS[family])


def lora_params(net: nn.Module, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA on every Linear and Conv2d of ``net`` (fewstep.models.lora's targets)."""
    n = 0
    for m in net.modules():
        if isinstance(m, nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            n += rank * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * rank
    return n


def encoder_params(unet: nn.Module) -> int:
    """Parameters of what ``features`` runs: conv_in, the time (and added-condition) embeddings, down and mid blocks."""
    parts = [unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block,
             getattr(unet, "add_embedding", None) or nn.Identity()]
    return sum(p.numel() for m in parts for p in m.parameters())


def counts(family: str) -> dict[str, Any]:
    unet = build_unet(family)
    return {"P": sum(p.numel() for p in unet.parameters()), "E": encoder_params(unet),
            "lora": lambda r, _u=unet: lora_params(_u, r) if r else 0}


def activations(cfg: dict, checkpointing: bool) -> dict[str, float]:
    """GB saved for backward by one training forward (batch 1, bf16): the whole UNet and its encoder + mid block."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    c = {"total": 0, "attention": 0, "encoder": None, "block": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, nn.Parameter) or (t.requires_grad and t.is_leaf)):
            nb = t.numel() * t.element_size()
            c["total"] += nb
            if t.ndim >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 1024:
                c["attention"] += nb
        return t

    def after_mid(*_: object) -> None:
        c["encoder"] = c["total"] - c["attention"]

    unet.mid_block.register_forward_hook(after_mid)
    # the largest unit gradient checkpointing recomputes at once (a ResNet block or a transformer block)
    starts: dict[int, int] = {}
    for m in unet.modules():
        if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock"):
            m.register_forward_pre_hook(lambda mod, *_: starts.__setitem__(id(mod), c["total"] - c["attention"]))
            m.register_forward_hook(lambda mod, *_: c.__setitem__("block", max(
                c["block"], c["total"] - c["attention"] - starts[id(mod)])))
    res = cfg["sample_size"]
    x = torch.randn(1, 4, res, res, device="meta", dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], device="meta", dtype=torch.bfloat16)
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 1280, device="meta", dtype=torch.bfloat16),
                                   "time_ids": torch.zeros(1, 6, device="meta", dtype=torch.bfloat16)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.tensor([500.0], device="meta"), ctx, **kw)
    return {"unet": (c["total"] - c["attention"]) / GB, "encoder": c["encoder"] / GB,
            "attention_matrices": c["attention"] / GB, "largest_block": c["block"] / GB}


VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=4, sample_size=512)  # SD's and SDXL's VAE (same architecture)


def vae_decode_activations(latent_side: int) -> float:
    """GB saved for backward by one VAE decode with gradient (batch 1, bf16), with gradient checkpointing as ADD enables
    it: the up blocks' inputs plus the largest up block recomputed at once (attention matrices excluded)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_CONFIG)
    vae = vae.to(torch.bfloat16).train()
    c = {"total": 0, "block": 0}
    for checkpointing in (False, True):
        if checkpointing:
            vae.enable_gradient_checkpointing()
        c["total"], starts, hooks = 0, {}, []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not (isinstance(t, nn.Parameter) or (t.requires_grad and t.is_leaf)):
                if not (t.ndim == 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 1024):  # attention
                    c["total"] += t.numel() * t.element_size()
            return t

        if not checkpointing:
            for m in vae.decoder.up_blocks:
                hooks.append(m.register_forward_pre_hook(lambda mod, *_: starts.__setitem__(id(mod), c["total"])))
                hooks.append(m.register_forward_hook(lambda mod, *_: c.__setitem__(
                    "block", max(c["block"], c["total"] - starts[id(mod)]))))
        z = torch.randn(1, 4, latent_side, latent_side, device="meta", dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vae.decode(z)
        for h in hooks:
            h.remove()
    return (c["total"] + c["block"]) / GB


# ----------------------------------------------------------------------------------------------------------------
# The recipes
# ----------------------------------------------------------------------------------------------------------------
def load_recipe(name: str, changes: dict[str, Any] | None = None) -> Any:
    """``configs/<name>.yaml`` through its method's config class (defaults filled in), with ``changes`` applied (to
    the wrapped method's block for DisBack)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    if changes:
        target = raw.setdefault(raw.get("base", "dmd2"), {}) if raw["method"] == "disback" else raw
        target.update(changes)
    return config_class(raw["method"]).model_validate(raw)


def config_class(method: str) -> type:
    from fewstep.config import DMD2Config
    from fewstep.methods.add import ADDConfig
    from fewstep.methods.disback import DisBackConfig
    from fewstep.methods.lightning import LightningConfig

    return {"dmd2": DMD2Config, "add": ADDConfig, "lightning": LightningConfig, "disback": DisBackConfig}[method]


Term = tuple[str, float, int]  # (what, parameters, bytes per parameter)


def _lora_players(cfg: Any) -> list[str]:
    """The players that are LoRA adapters (dmd2: lora_players when the field exists, else both, today's meaning)."""
    if not getattr(cfg, "lora_rank", None):
        return []
    return list(getattr(cfg, "lora_players", ["generator", "fake_score"]))


def _per_step_fakes(cfg: Any) -> int:
    """How many per-step adapters DMD2's fake score carries (0: one shared fake score; absent field: shared)."""
    return cfg.steps if getattr(cfg, "fake_score", "shared") == "per_step" and cfg.steps > 1 else 0


def _dmd2_terms(cfg: Any, n: dict[str, Any], disback: bool = False) -> tuple[list[Term], list[Term]]:
    """(GPU terms, checkpoint terms) of DMD2's one phase; ``disback``: the fake score's D^(N) unshares a LoRA base."""
    P, L, lora = n["P"], n["lora"](cfg.lora_rank), _lora_players(cfg)
    gpu: list[Term] = [("teacher, frozen", P, FROZEN)]
    ckpt: list[Term] = []
    for player, label in (("generator", "generator"), ("fake_score", "fake score")):
        if player in lora:
            gpu.append((f"{label} LoRA, trained", L, TRAINED))
            if player == "fake_score" and disback:
                gpu.append(("fake score's own base (D^(N) loaded into it), frozen", P, FROZEN))
            ckpt += [(f"{label} base (its state dict), bf16", P, 2), (f"{label} LoRA + AdamW", L, 12)]
        else:
            gpu.append((f"{label}, trained", P, TRAINED))
            ckpt.append((f"{label} + AdamW", P, 12))
    k_steps = _per_step_fakes(cfg)
    if k_steps:  # fake_score: per_step: one rank-fake_step_rank adapter per student step on the fake score's trunk
        A = n["lora"](cfg.fake_step_rank)
        gpu.append((f"fake score per-step adapters ({k_steps} x rank {cfg.fake_step_rank}), trained", k_steps * A,
                    TRAINED))
        ckpt.append(("fake score per-step adapters + AdamW", k_steps * A, 12))
    if cfg.gan:
        gpu.append(("GAN head, trained", HEAD_PARAMS, TRAINED))
        ckpt.append(("GAN head + AdamW", HEAD_PARAMS, 12))
    if cfg.ema_decay is not None:
        k = L if "generator" in lora else P
        gpu.append(("generator EMA", k, EMA))
        ckpt.append(("generator EMA", k, 4))
    return gpu, ckpt


def _add_terms(cfg: Any, n: dict[str, Any]) -> tuple[list[Term], list[Term]]:
    P, L = n["P"], n["lora"](cfg.lora_rank)
    gpu: list[Term] = [("teacher, frozen", P, FROZEN)]
    if cfg.lora_rank:
        gpu.append(("student LoRA, trained", L, TRAINED))
        ckpt: list[Term] = [("student base (its state dict), bf16", P, 2), ("student LoRA + AdamW", L, 12)]
    else:
        gpu.append(("student, trained", P, TRAINED))
        ckpt = [("student + AdamW", P, 12)]
    if cfg.ema_decay is not None:
        k = L if cfg.lora_rank else P
        gpu.append(("student EMA", k, EMA))
        ckpt.append(("student EMA", k, 4))
    if cfg.adversarial:
        gpu.append(("discriminator heads, trained", HEAD_PARAMS, TRAINED))
        ckpt.append(("discriminator heads + AdamW", HEAD_PARAMS, 12))
        if cfg.feature_network == "timm":
            size = next((v for k, v in TIMM_PARAMS.items() if k in cfg.timm_model), TIMM_PARAMS["small"])
            gpu.append((f"feature network {cfg.timm_model}, frozen", size, FROZEN))
    return gpu, ckpt


def _lightning_phases(cfg: Any, n: dict[str, Any]) -> tuple[list[tuple[str, list[Term]]], list[Term], float]:
    """Lightning's distinct phases (the student's stage and what trains), the largest checkpoint's terms, and the
    parameters of what it writes besides checkpoints (finished stages, exported students)."""
    P, E, L = n["P"], n["E"], n["lora"](cfg.lora_rank)
    trained_backbone = cfg.lr_discriminator > 0
    stages = cfg.stages()
    disc: list[Term] = [("discriminator heads, trained", HEAD_PARAMS, TRAINED)]
    if trained_backbone:  # a whole-UNet copy held by AdamW; features() trains its encoder + mid block only
        disc = [("discriminator backbone copy: encoder + mid block, trained", E, TRAINED),
                ("discriminator backbone copy: rest of the UNet, held (fp32, no gradient)", P - E, HELD)] + disc
    # the discriminator's backbone is the frozen teacher itself when lr_discriminator is 0 (no term)
    phases: list[tuple[str, list[Term]]] = []
    kinds = {(s > 0, k) for s in range(len(stages)) for k in cfg.phase_kinds(s)}
    for later, kind in sorted(kinds, key=lambda x: (x[0], x[1])):
        terms: list[Term] = [("teacher, frozen", P, FROZEN)]
        if later:
            terms.append(("previous stage's student (stage teacher), frozen", P, FROZEN))
        if kind.startswith("lora"):
            terms += [("student base, held (fp32, no gradient)", P, HELD), ("student LoRA, trained", L, TRAINED)]
        else:
            terms += [("student, trained", P, TRAINED), ("student LoRA (switched off), held", L, HELD)]
        if kind != "mse":
            terms += disc
        phases.append((f"{'stage 2+' if later else 'stage 1'}: {kind}", terms))
    ckpt: list[Term] = [("student + LoRA + AdamW", P + L, 12)]
    ckpt.append(("discriminator heads + AdamW", HEAD_PARAMS, 12))
    if trained_backbone:
        ckpt += [("discriminator backbone copy + AdamW (encoder)", E, 12), ("rest of the copy", P - E, 4)]
    extra = (len(stages) - 1) * P + len(stages) * (P + n["lora"](cfg.lora_export_rank)) + P  # stages/, students/, student
    return phases, ckpt, extra


def _gb(terms: list[Term]) -> float:
    return sum(p * b for _, p, b in terms) / GB


def plan(name: str, cfg: Any, n: dict[str, Any], act: dict[str, float], act_full: dict[str, float],
         family: str) -> list[dict[str, Any]]:
    """One row per phase of recipe ``name`` (config ``cfg``): what it holds, the peak at the config's batch, whether it
    fits one 80 GB GPU, and the run's checkpoint size and disk."""
    f = act["encoder_ratio"]
    per_sample = lambda passes: passes * act["unet"] + act_full["largest_block"]  # noqa: E731  (checkpointed)
    P = n["P"]
    loop = cfg.loop
    rows: list[tuple[str, list[Term], float, int]] = []  # (phase, terms, activation passes, batch)
    extra_act = 0.0  # GB per sample besides the UNet passes
    extra_disk = P  # the exported student (fp32)
    if cfg.method == "dmd2":
        gpu, ckpt = _dmd2_terms(cfg, n)
        rows.append(("training", gpu, 1 + 2 * f, loop.batch_size))
    elif cfg.method == "add":
        gpu, ckpt = _add_terms(cfg, n)
        rows.append(("training", gpu, 1 + f, loop.batch_size))
        if cfg.feature_network == "timm" or cfg.distill_space == "pixel":  # the student's x0 decoded with gradient
            extra_act = act["vae_decode"]
    elif cfg.method == "lightning":
        phases, ckpt, extra_disk = _lightning_phases(cfg, n)
        rows += [(ph, terms, 1 + 4 * f if "mse" not in ph else 1.0, loop.batch_size) for ph, terms in phases]
    else:  # disback
        base = cfg.base_config()
        if cfg.base == "dmd2":
            gpu, ckpt = _dmd2_terms(base, n, disback=True)
        else:
            gpu, ckpt = _add_terms(base, n)
        # the recording runs first, before the wrapped method is moved to the GPU: the copy it trains and the
        # initial generator (a LoRA generator's snapshot is its whole network: base + adapters) held in bf16
        gen = P + (n["lora"](base.lora_rank) if "generator" in _lora_players(base) or
                   (cfg.base == "add" and base.lora_rank) else 0)
        bf16 = (cfg.record_mixed_precision or ("bf16" if loop.mixed_precision == "bf16" else "no")) == "bf16"
        rec: list[Term] = [("degrading copy D_deg, trained (fp32)", P, TRAINED),
                           ("initial generator, frozen" + ("" if bf16 else " (fp32)"), gen, 2 if bf16 else 4)]
        rows.append(("recording", rec, 1.0 if bf16 else 2.0, cfg.record_batch_size or loop.batch_size))
        gpu = gpu + [("target copy (the path's checkpoints are loaded into it), frozen", P, FROZEN)]
        rows.append(("backtracking", gpu, 1 + 2 * f if cfg.base == "dmd2" else 1 + f, loop.batch_size))
        extra_disk = P + cfg.record_checkpoints * P  # the student, and the path: N fp32 UNets
    encoders = (TEXT_ENCODERS[family] + VAE) * 2 / GB
    ckpt_gb = _gb([(w, p, b) for w, p, b in ckpt])
    disk_gb = (loop.keep_checkpoints + 1) * ckpt_gb + extra_disk * 4 / GB
    out = []
    for phase, terms, passes, batch in rows:
        states = _gb(terms)
        act_gb = per_sample(passes) + extra_act
        peak = states + encoders + ALLOWANCE_GB + batch * act_gb
        out.append({
            "data": family, "method": cfg.method, "variant": phase, "recipe": f"configs/{name}.yaml",
            "phase": phase, "held": {w: round(p * b / GB, 2) for w, p, b in terms},
            "states_gb": round(states, 1), "encoders_vae_gb": round(encoders, 1),
            "activations_gb_per_sample_checkpointed": round(act_gb, 2), "batch": batch,
            "peak_gb": round(peak, 1), "fits_gb": GPU_GB, "fits": peak <= GPU_GB,
            "batch_per_80gb_checkpointed": int(max(0.0, GPU_GB - ALLOWANCE_GB - states - encoders) // act_gb),
            "checkpoint_gb": round(ckpt_gb, 1), "keep_checkpoints": loop.keep_checkpoints,
            "disk_gb": round(disk_gb, 1), "unet_params": P, "encoder_params": n["E"],
        })
    return out


def budget() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, shared = [], {}
    for family in ("sd15", "sdxl"):
        n = counts(family)
        act, act_gc = activations(UNETS[family], False), activations(UNETS[family], True)
        act_gc["encoder_ratio"] = act["encoder"] / act["unet"]
        act_gc["vae_decode"] = vae_decode_activations(UNETS[family]["sample_size"])
        shared[family] = {"unet_params": n["P"], "encoder_params": n["E"], "lora_params": n["lora"](LORA_RANK),
                          "activations_unet_gb": round(act["unet"], 2), "activations_encoder_gb": round(act["encoder"], 2),
                          "activations_unet_gb_checkpointed": round(act_gc["unet"], 2),
                          "attention_matrices_gb": round(act["attention_matrices"], 2),
                          "largest_block_gb": round(act["largest_block"], 2),
                          "vae_decode_gb_checkpointed": round(act_gc["vae_decode"], 2)}
        # DMD2's per-step fake score at 4 steps (README, DMD2): what 4 adapters of rank r add, against the 3 more
        # full trained copies that one fake score per step would hold
        shared[family]["dmd2_per_step_4_steps_gb"] = {
            **{f"adapters_rank_{r}": round(4 * n["lora"](r) * TRAINED / GB, 2) for r in (8, 16, 64)},
            "full_copies": round(3 * n["P"] * TRAINED / GB, 1)}
        for name in RECIPES:
            if name.startswith(family + "_"):
                rows += plan(name, load_recipe(name), n, act_gc, act, family)
        for name, variant, changes in VARIANTS:
            if name.startswith(family + "_"):
                for r in plan(name, load_recipe(name, changes), n, act_gc, act, family):
                    r.update(variant=f"{r['phase']}, {variant}", changes=changes)
                    rows.append(r)
    return rows, shared


# ----------------------------------------------------------------------------------------------------------------
# The README's tables
# ----------------------------------------------------------------------------------------------------------------
def _markers(block: str) -> tuple[str, str]:
    return (f"<!-- {block}: begin (python benchmarks/memory_budget.py --readme) -->", f"<!-- {block}: end -->")


def readme_tables(results: dict[str, Any]) -> dict[str, str]:
    """The README's generated blocks, by marker name: ``memory_budget`` (per recipe and phase, what it holds and
    whether it fits) and ``disk_budget`` (each recipe's checkpoint and the disk its run needs)."""
    name = {"sd15": "SD 1.5", "sdxl": "SDXL"}
    begin, end = _markers("memory_budget")
    lines = [begin, "",
             "| recipe | phase | weights + gradients + optimizer states (+ EMA) | act./sample | batch | peak | fits 80 GB? |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        recipe = f"`{r['recipe'].split('/')[-1]}`" + (" (variant)" if "changes" in r else "")
        lines.append(f"| {recipe} | {r['variant']} | {r['states_gb']:.1f} GB | "
                     f"{r['activations_gb_per_sample_checkpointed']:.2f} GB | {r['batch']} | {r['peak_gb']:.1f} GB | "
                     f"{'yes' if r['fits'] else '**no**'} |")
    memory = "\n".join(lines + ["", end])
    begin, end = _markers("disk_budget")
    lines = [begin, "", "| recipe | one checkpoint | kept + the one being written | disk the run needs |",
             "| --- | --- | --- | --- |"]
    seen = set()
    for r in results["rows"]:
        if "changes" in r or r["recipe"] in seen:
            continue
        seen.add(r["recipe"])
        lines.append(f"| `{r['recipe'].split('/')[-1]}` ({name[r['data']]}) | {r['checkpoint_gb']:.1f} GB | "
                     f"{r['keep_checkpoints']} + 1 | {r['disk_gb']:.0f} GB |")
    return {"memory_budget": memory, "disk_budget": "\n".join(lines + ["", end])}


def write_readme(results: dict[str, Any], path: Path = README) -> None:
    text = path.read_text()
    for block, body in readme_tables(results).items():
        begin, end = _markers(block)
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path}: no '{begin}' ... '{end}' block to replace")
        text = pattern.sub(lambda _, b=body: b, text)
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="store_true", help="also rewrite the README's generated tables")
    args = ap.parse_args()
    rows, shared = budget()
    for r in rows:
        print(f"{r['recipe']:30s} {r['variant']:45s} states {r['states_gb']:6.1f} GB  peak {r['peak_gb']:6.1f} GB "
              f"(batch {r['batch']:2d})  ckpt {r['checkpoint_gb']:5.1f} GB  disk {r['disk_gb']:6.1f} GB")
    meta = {"command": "python benchmarks/memory_budget.py", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, meta device (no compute)", "torch": torch.__version__,
            "lora_rank": LORA_RANK, "resolution": {"sd15": 512, "sdxl": 1024}, "gpu_gb": GPU_GB,
            "allowance_gb": ALLOWANCE_GB, "head_params": HEAD_PARAMS, "families": shared}
    results = {"meta": meta, "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    if args.readme:
        write_readme(results)
        print(f"rewrote the generated tables in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
