"""The shipped SD 1.5 / SDXL recipes (configs/sd15_*.yaml, configs/sdxl_*.yaml) hold to their memory plan.

For every recipe and every phase it runs, this test tallies on its own what the phase holds on the GPU -- weights,
gradients, optimizer states, EMA copies, LoRA adapters, frozen copies -- from the config's fields (read through the
method's config class, so a field another change has not added yet takes its default meaning) and from the UNets
built from their published configs on the meta device (exact parameter counts; the LoRA counted by fewstep's own
injection, not by a formula). The tally must equal the claim in benchmarks/results/memory_budget.json (within its
0.1 GB rounding), every claimed peak must fit the 80 GB GPU the README promises, and the README's generated tables
must be the JSON's. When a recipe changes, regenerate both: ``python benchmarks/memory_budget.py --readme``.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_budget as mb  # noqa: E402

GB = 1e9
RECIPES = sorted(p.stem for pattern in ("sd15_*.yaml", "sdxl_*.yaml") for p in (ROOT / "configs").glob(pattern))
REGENERATE = "run `python benchmarks/memory_budget.py --readme` after changing a recipe"
TOL = 0.051  # the JSON rounds to 0.1 GB


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(mb.RESULTS.read_text())


@pytest.fixture(scope="module")
def nets() -> dict:
    """Per family: UNet parameters P, encoder + mid block parameters E, and LoRA parameters per unit of rank (a
    rank-1 LoRA injected by fewstep.models.lora on a meta copy: every term of a LoRA's size is linear in the rank)."""
    from fewstep.models.lora import apply_lora

    out = {}
    for family in ("sd15", "sdxl"):
        unet = mb.build_unet(family)
        adapted = apply_lora(copy.deepcopy(unet), 1)
        encoder = [unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block]
        if getattr(unet, "add_embedding", None) is not None:
            encoder.append(unet.add_embedding)
        out[family] = {"P": sum(p.numel() for p in unet.parameters()),
                       "E": sum(p.numel() for m in encoder for p in m.parameters()),
                       "L1": sum(p.numel() for p in adapted.parameters() if p.requires_grad)}
    return out


def lora_players(cfg) -> set[str]:
    if not getattr(cfg, "lora_rank", None):
        return set()
    return set(getattr(cfg, "lora_players", ("generator", "fake_score")))  # absent field: today's meaning, both


def dmd2_tally(cfg, n: dict, disback: bool = False) -> tuple[float, float]:
    """(bytes on the GPU, bytes in a checkpoint) of a DMD2 run."""
    P, L = n["P"], n["L1"] * (cfg.lora_rank or 0)
    lora = lora_players(cfg)
    gpu, ckpt = 2 * P, 0.0  # the frozen teacher in bf16
    for player in ("generator", "fake_score"):
        if player in lora:  # adapters on the teacher's own bf16 tensors (which are in the player's state dict)
            gpu += 16 * L + (2 * P if player == "fake_score" and disback else 0)  # D^(N) unshares the fake's base
            ckpt += 2 * P + 12 * L
        else:
            gpu += 16 * P
            ckpt += 12 * P
    if getattr(cfg, "fake_score", "shared") == "per_step" and cfg.steps > 1:  # one adapter per step on the fake
        A = cfg.steps * n["L1"] * cfg.fake_step_rank
        gpu, ckpt = gpu + 16 * A, ckpt + 12 * A
    if cfg.gan:
        gpu, ckpt = gpu + 16 * mb.HEAD_PARAMS, ckpt + 12 * mb.HEAD_PARAMS
    if cfg.ema_decay is not None:
        k = L if "generator" in lora else P
        gpu, ckpt = gpu + 4 * k, ckpt + 4 * k
    return gpu, ckpt


def add_tally(cfg, n: dict) -> tuple[float, float]:
    P, L = n["P"], n["L1"] * (cfg.lora_rank or 0)
    k = L if cfg.lora_rank else P
    gpu = 2 * P + 16 * k + (4 * k if cfg.ema_decay is not None else 0)
    ckpt = (2 * P if cfg.lora_rank else 0) + 12 * k + (4 * k if cfg.ema_decay is not None else 0)
    if cfg.adversarial:
        gpu, ckpt = gpu + 16 * mb.HEAD_PARAMS, ckpt + 12 * mb.HEAD_PARAMS
        if cfg.feature_network == "timm":
            gpu += 2 * next(v for key, v in mb.TIMM_PARAMS.items() if key in cfg.timm_model)
    return gpu, ckpt


def lightning_tally(cfg, n: dict) -> tuple[dict[str, float], float]:
    """Per phase ("stage 1: mse", "stage 2+: full_uncond", ...) the bytes on the GPU; and the largest checkpoint."""
    P, E, L = n["P"], n["E"], n["L1"] * cfg.lora_rank
    trained_backbone = cfg.lr_discriminator > 0  # 0: the backbone is the frozen teacher itself
    disc = 16 * mb.HEAD_PARAMS + (16 * E + 4 * (P - E) if trained_backbone else 0)
    phases = {}
    for s in range(len(cfg.stages())):
        for kind in cfg.phase_kinds(s):
            student = 4 * P + 16 * L if kind.startswith("lora") else 16 * P + 4 * L
            phases[f"stage {'2+' if s else '1'}: {kind}"] = (
                2 * P + (2 * P if s else 0) + student + (disc if kind != "mse" else 0))
    ckpt = 12 * (P + L) + 12 * mb.HEAD_PARAMS + (12 * E + 4 * (P - E) if trained_backbone else 0)
    return phases, ckpt


def tally(name: str, n: dict) -> tuple[dict[str, float], float, float]:
    """(bytes per phase, checkpoint bytes, bytes written besides checkpoints) of recipe ``name``."""
    cfg = mb.load_recipe(name)
    P = n["P"]
    if cfg.method == "dmd2":
        gpu, ckpt = dmd2_tally(cfg, n)
        return {"training": gpu}, ckpt, 4 * P
    if cfg.method == "add":
        gpu, ckpt = add_tally(cfg, n)
        return {"training": gpu}, ckpt, 4 * P
    if cfg.method == "lightning":
        phases, ckpt = lightning_tally(cfg, n)
        k = len(cfg.stages())
        written = 4 * ((k - 1) * P + k * (P + n["L1"] * cfg.lora_export_rank) + P)  # stages/, students/, student
        return phases, ckpt, written
    base = cfg.base_config()
    gpu, ckpt = dmd2_tally(base, n, disback=True) if cfg.base == "dmd2" else add_tally(base, n)
    bf16 = (cfg.record_mixed_precision or ("bf16" if cfg.loop.mixed_precision == "bf16" else "no")) == "bf16"
    snapshot = P + (n["L1"] * base.lora_rank if "generator" in lora_players(base) else 0)
    recording = 16 * P + (2 if bf16 else 4) * snapshot  # nothing else is on the GPU yet
    return {"recording": recording, "backtracking": gpu + 2 * P}, ckpt, 4 * P * (1 + cfg.record_checkpoints)


def test_every_shipped_recipe_is_planned(results: dict) -> None:
    assert set(mb.RECIPES) == set(RECIPES), "benchmarks/memory_budget.py RECIPES must list every shipped recipe"
    planned = {r["recipe"] for r in results["rows"] if "changes" not in r}
    assert planned == {f"configs/{n}.yaml" for n in RECIPES}, REGENERATE


@pytest.mark.parametrize("name", RECIPES)
def test_each_phase_fits_the_memory_the_readme_claims(name: str, nets: dict, results: dict) -> None:
    family = name.split("_")[0]
    phases, ckpt, written = tally(name, nets[family])
    cfg = mb.load_recipe(name)
    rows = {r["phase"]: r for r in results["rows"] if r["recipe"] == f"configs/{name}.yaml" and "changes" not in r}
    assert set(rows) == set(phases), f"{name}: planned phases {sorted(rows)} != {sorted(phases)}; {REGENERATE}"
    for phase, held in phases.items():
        r = rows[phase]
        assert held / GB <= r["states_gb"] + TOL, f"{name} {phase}: holds {held / GB:.2f} GB, README claims " \
                                                  f"{r['states_gb']} GB; {REGENERATE}"
        assert r["states_gb"] <= held / GB + TOL, f"{name} {phase}: the claim is stale; {REGENERATE}"
        batch = (cfg.record_batch_size or cfg.loop.batch_size) if phase == "recording" else cfg.loop.batch_size
        assert r["batch"] == batch, f"{name} {phase}: the claim is for batch {r['batch']}; {REGENERATE}"
        peak = r["states_gb"] + r["encoders_vae_gb"] + results["meta"]["allowance_gb"] + \
            batch * r["activations_gb_per_sample_checkpointed"]
        assert abs(peak - r["peak_gb"]) <= 0.2 and r["peak_gb"] <= results["meta"]["gpu_gb"] and r["fits"], \
            f"{name} {phase}: {r['peak_gb']} GB at batch {batch} does not fit one {results['meta']['gpu_gb']} GB GPU"
        assert abs(ckpt / GB - r["checkpoint_gb"]) <= TOL, f"{name}: checkpoint {ckpt / GB:.2f} GB; {REGENERATE}"
        disk = (cfg.loop.keep_checkpoints + 1) * ckpt + written
        assert abs(disk / GB - r["disk_gb"]) <= 0.2, f"{name}: disk {disk / GB:.1f} GB; {REGENERATE}"


def test_the_readme_tables_are_the_json(results: dict) -> None:
    text = mb.README.read_text()
    for block, body in mb.readme_tables(results).items():
        assert body in text, f"README's {block} block differs from the JSON; {REGENERATE}"
