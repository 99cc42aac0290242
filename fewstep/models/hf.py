"""Teachers from a local diffusers folder, wrapped so they are :class:`~fewstep.diffusion.denoiser.Denoiser` s.

A *diffusers folder* is a pipeline folder (``model_index.json`` with one sub-folder per component, as
``pipe.save_pretrained`` writes it) or a bare model folder (``config.json`` + weights, with the scheduler's
``scheduler_config.json`` beside it or in ``../scheduler/``). Nothing is ever downloaded.

Supported denoisers (the *family* is what :class:`DiffusersNet` switches on):

=========================  ===========  =========================================================================
model class                family       condition
=========================  ===========  =========================================================================
``UNet2DModel``            ``unet``     none (or class labels when ``num_class_embeds`` is set); pixel space
``UNet2DConditionModel``   ``unet_cond`` CLIP prompt embeddings ``{"encoder_hidden_states"}``; latent with a VAE;
                                        SDXL adds ``"text_embeds"`` (pooled) and its size ids
``DiTTransformer2DModel``  ``dit``      class labels, null class = ``num_embeds_ada_norm`` (DiT's CFG class)
``Transformer2DModel``     ``dit``      (patched, ``ada_norm_zero``: the same DiT)
``SD3Transformer2DModel``  ``sd3``      ``{"encoder_hidden_states", "pooled_projections"}``; flow matching
``FluxTransformer2DModel`` ``flux``     ``{"encoder_hidden_states", "pooled_projections"}``; flow, packed 2x2
=========================  ===========  =========================================================================

The denoiser works in the model's own space: latents for latent pipelines (``x = (vae_mean - shift) * scale``, the
VAE posterior's *mean*, so encoded training data is deterministic and cacheable), pixels otherwise; ``decode`` maps
latents back to images in ``[-1, 1]`` for sample grids and evaluation.

The scheduler config maps onto our schedules (:func:`schedule_from_scheduler_config`): DDPM-family schedulers
(DDPM, DDIM, PNDM, Euler, DPM-Solver, LCM, ...) to :class:`DDPMSchedule` with their ``beta_schedule``,
``beta_start``/``beta_end``, ``rescale_betas_zero_snr``, ``timestep_spacing`` and ``steps_offset``, and
``prediction_type`` ``epsilon``/``v_prediction``/``sample``; ``FlowMatchEulerDiscreteScheduler`` to
:class:`FlowSchedule` with its ``shift`` (Flux's resolution-dependent ``use_dynamic_shifting`` becomes the fixed shift
``exp(mu)`` at the model's sample size, which is what diffusers computes for that size).

Prompt embeddings come from the pipeline's own ``encode_prompt`` (so CLIP, the two CLIPs of SD3 and Flux's CLIP + T5
are encoded exactly as diffusers does), once per caption, kept in a :class:`PromptBank` (memory, and a safetensors
file in the cache when a cache folder is given). ``null_cond`` is the empty prompt's embedding, as diffusers' CFG uses
(zeros for SDXL, whose pipelines set ``force_zeros_for_empty_prompt``). A condition of ``None`` is the null one.

``features(x_t, t, cond)`` is the output of the UNet's mid block (after the down blocks), or the image tokens of the
transformer's middle block on their patch grid ``(B, D, h, w)``; the forward pass stops there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import DDPMSchedule, FlowSchedule, Schedule
from ..errors import UserError

#: diffusers model class -> family
FAMILIES = {
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet_cond",
    "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
TEXT_FAMILIES = ("unet_cond", "sd3", "flux")
DENOISER_COMPONENTS = ("unet", "transformer")
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
FORMAT = "diffusers"


# ----------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); re-save the model with save_pretrained") from None


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a diffusers pipeline folder (``model_index.json``) or a bare model folder whose ``config.json``
    names a diffusers class."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            return "_diffusers_version" in json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return False
    return False


def missing_index_message(path: str | Path) -> str | None:
    """For a folder that holds a pipeline's components (``unet/``, ``scheduler/``, ...) but no ``model_index.json``:
    the one-line error naming the missing file; else None."""
    path = Path(path)
    if not path.is_dir() or (path / "model_index.json").is_file() or (path / "config.json").is_file():
        return None
    parts = [n for n in (*DENOISER_COMPONENTS, "vae", "text_encoder", "scheduler")
             if (path / n / "config.json").is_file() or (path / n / "scheduler_config.json").is_file()]
    if not parts:
        return None
    return (f"{path / 'model_index.json'} is missing: {path} holds pipeline components ({', '.join(parts)}) but not "
            "the index that lists them; copy model_index.json from the original model (or re-save it with "
            "save_pretrained)")


def _check_pipeline_folder(path: Path) -> dict[str, Any]:
    index = _read_json(path / "model_index.json")
    comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    for name, (lib, cls) in comps.items():
        if lib is None or cls is None:
            continue
        sub = path / name
        if not sub.is_dir():
            raise UserError(f"{path}: model_index.json lists the component {name!r} ({cls}) but the folder {sub} is "
                            f"missing; copy it from the original model, or set \"{name}\": [null, null]")
        if name in DENOISER_COMPONENTS + ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if not (sub / "config.json").is_file():
                raise UserError(f"{sub}/config.json is missing; copy the component {name!r} completely")
            if not any(p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json") for p in sub.iterdir()):
                raise UserError(f"{sub} holds no weights (*.safetensors); copy the component {name!r} completely")
    if not any(n in comps and comps[n][1] for n in DENOISER_COMPONENTS):
        raise UserError(f"{path}: the pipeline has no 'unet' or 'transformer' component; fewstep distills those")
    sched = path / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise UserError(f"{sched} is missing; copy the pipeline's scheduler folder (it defines the noise schedule)")
    return comps


def _scheduler_config_for_bare(path: Path) -> dict[str, Any]:
    for cand in (path / "scheduler_config.json", path.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return _read_json(cand)
    raise UserError(f"{path}: a bare model folder needs its noise schedule: put the scheduler's scheduler_config.json "
                    f"in {path} (or give the pipeline folder)")


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------
def flux_shift(config: dict[str, Any], image_seq_len: int) -> float:
    """diffusers' ``calculate_shift``: ``mu`` linear in the packed image's token count; the shift is ``exp(mu)``."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return float(math.exp(image_seq_len * m + base_shift - m * base_len))


def schedule_from_scheduler_config(config: dict[str, Any], family: str,
                                   sample_shape: tuple[int, ...]) -> tuple[Schedule, str]:
    """Our schedule and prediction type for a diffusers scheduler config (see the module docstring)."""
    name = config.get("_class_name", "")
    T = int(config.get("num_train_timesteps", 1000))
    if "FlowMatch" in name or family in ("sd3", "flux"):
        if "FlowMatch" not in name:
            raise UserError(f"{family} models are flow-matching models, but the scheduler is {name!r}; give the "
                            "pipeline's FlowMatchEulerDiscreteScheduler config")
        if config.get("use_dynamic_shifting"):
            h, w = sample_shape[-2:]
            shift = flux_shift(config, (h // 2) * (w // 2))
        else:
            shift = float(config.get("shift", 1.0))
        return FlowSchedule(T, shift), "flow"
    if name.startswith("EDM") or "Consistency" in name:
        raise UserError(f"scheduler {name!r} is not supported; fewstep maps DDPM-family schedulers (DDPM, DDIM, Euler, "
                        "DPM-Solver, ...) and FlowMatchEulerDiscreteScheduler")
    if config.get("trained_betas") is not None:
        raise UserError("schedulers with trained_betas are not supported; use a beta_schedule (linear, scaled_linear, "
                        "squaredcos_cap_v2)")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise UserError(f"beta_schedule {beta_schedule!r} is not supported; use linear, scaled_linear or "
                        "squaredcos_cap_v2")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise UserError(f"prediction_type {prediction!r} is not supported; use epsilon, v_prediction or sample")
    spacing = config.get("timestep_spacing", "linspace" if "Euler" in name else "leading")
    if spacing not in ("trailing", "leading", "linspace"):
        spacing = "trailing"
    schedule = DDPMSchedule(
        num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
        rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)), timestep_spacing=spacing,
        steps_offset=int(config.get("steps_offset", 0)))
    return schedule, prediction


# ----------------------------------------------------------------------------------------------------------------
# What is shared, never copied: the pipeline's text encoders, tokenizers and VAE, and the prompt bank
# ----------------------------------------------------------------------------------------------------------------
class PromptBank:
    """Encoded prompts, one row per caption: a dict of tensors ``(P, ...)`` on the CPU; ``lookup(idx)`` indexes it."""

    def __init__(self, table: dict[str, Tensor], captions: list[str]):
        self.table = {k: v.detach().cpu() for k, v in table.items()}
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def lookup(self, idx: Tensor) -> dict[str, Tensor]:
        i = idx.detach().long().cpu()
        return {k: v[i].to(idx.device) for k, v in self.table.items()}


class Components:
    """The pipeline around the denoiser: tokenizers, text encoders, VAE (frozen, shared by every copy).

    ``copy.deepcopy`` returns the same object, so a generator or fake score copied from the teacher shares them.
    """

    def __init__(self, folder: Path, family: str, pipe: Any = None, vae: Any = None) -> None:
        self.folder = Path(folder)
        self.family = family
        self.pipe = pipe
        self.vae = vae
        self.prompts: PromptBank | None = None
        unet = getattr(pipe, "unet", None) if pipe is not None else None
        #: SDXL-style UNet: pooled text embeddings and size/crop ids join the time embedding ("text_time")
        self.sdxl = unet is not None and unet.config.get("addition_embed_type") == "text_time"
        #: SDXL's CFG negative for an empty prompt is zeros, not the encoded empty prompt
        self.zero_null = bool(pipe is not None and pipe.config.get("force_zeros_for_empty_prompt", False))
        if vae is not None:
            vae.eval().requires_grad_(False)
            self.scaling_factor = float(vae.config.get("scaling_factor", 1.0) or 1.0)
            self.shift_factor = float(vae.config.get("shift_factor", 0.0) or 0.0)
            self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if pipe is not None:
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                enc = getattr(pipe, name, None)
                if enc is not None:
                    enc.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "Components":
        return self

    @property
    def latent(self) -> bool:
        return self.vae is not None

    def _device(self) -> torch.device:
        enc = getattr(self.pipe, "text_encoder", None) if self.pipe is not None else None
        return next(enc.parameters()).device if enc is not None else torch.device("cpu")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> dict[str, Tensor]:
        """Prompt embeddings with the pipeline's own ``encode_prompt``: ``{"encoder_hidden_states"}`` plus
        ``"text_embeds"`` (SDXL) or ``"pooled_projections"`` (SD3, Flux), each ``(len(prompts), ...)`` on the CPU."""
        if self.pipe is None or not hasattr(self.pipe, "encode_prompt"):
            raise UserError(f"{self.folder}: encoding prompts needs the pipeline folder with its text encoders and "
                            "tokenizers (model_index.json, text_encoder/, tokenizer/)")
        out: dict[str, list[Tensor]] = {}
        device = self._device()
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            if self.family == "unet_cond" and self.sdxl:
                embeds, _, pooled, _ = self.pipe.encode_prompt(chunk, None, device, 1, False)
                parts = {"encoder_hidden_states": embeds, "text_embeds": pooled}
            elif self.family == "unet_cond":
                embeds, _ = self.pipe.encode_prompt(chunk, device, 1, False)
                parts = {"encoder_hidden_states": embeds}
            elif self.family == "sd3":
                embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None,
                                                               device=device, do_classifier_free_guidance=False)
                parts = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            elif self.family == "flux":
                embeds, pooled, _ = self.pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device)
                parts = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            else:
                raise UserError(f"{self.family} models are not text-conditional")
            for k, v in parts.items():
                out.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def prompt_bank(self, captions: list[str], cache_dir: str | Path | None = None) -> PromptBank:
        """Encode ``captions`` once (or read them from ``cache_dir``) and keep them as this pipeline's bank."""
        key = hashlib.sha256(json.dumps([str(self.folder.resolve()), captions]).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"prompts_{key}.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            table = load_file(path)
        else:  # each distinct caption encoded once (shapes: 640 phrasings of 8,192 captions)
            distinct = list(dict.fromkeys(captions))
            table = self.encode_prompts(distinct)
            if len(distinct) < len(captions):
                row = {c: i for i, c in enumerate(distinct)}
                rows = torch.tensor([row[c] for c in captions])
                table = {k: v[rows] for k, v in table.items()}
            if path is not None:
                from safetensors.torch import save

                from ..io import atomic_write_bytes

                atomic_write_bytes(path, save({k: v.contiguous() for k, v in table.items()}))
        self.prompts = PromptBank(table, captions)
        return self.prompts

    @torch.no_grad()
    def encode_images(self, x: Tensor, batch_size: int = 32) -> Tensor:
        """Images in ``[-1, 1]`` -> latents ``(mean - shift) * scale`` (the VAE posterior's mean)."""
        assert self.vae is not None
        device = next(self.vae.parameters()).device
        dtype = next(self.vae.parameters()).dtype
        out = []
        for i in range(0, len(x), batch_size):
            dist = self.vae.encode(x[i : i + batch_size].to(device, dtype)).latent_dist
            out.append(((dist.mean - self.shift_factor) * self.scaling_factor).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: Tensor, batch_size: int = 16) -> Tensor:
        """Latents -> images in ``[-1, 1]`` (clamped), on the CPU (decoded on the GPU when there is one)."""
        assert self.vae is not None
        home = next(self.vae.parameters()).device
        device = _encoding_device()
        self.vae.to(device)
        dtype = next(self.vae.parameters()).dtype
        out = []
        try:
            for i in range(0, len(z), batch_size):
                zi = z[i : i + batch_size].to(device, dtype) / self.scaling_factor + self.shift_factor
                out.append(self.vae.decode(zi).sample.float().clamp(-1, 1).cpu())
        finally:
            self.vae.to(home)
        return torch.cat(out)

    def decode_with_grad(self, z: Tensor) -> Tensor:
        """Latents -> images (about ``[-1, 1]``, not clamped) with autograd through the frozen VAE, on ``z``'s device:
        what a loss on decoded student samples backpropagates through (ADD's pixel feature networks)."""
        assert self.vae is not None
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(dtype) / self.scaling_factor + self.shift_factor).sample.float()

    def to(self, device: Any) -> "Components":
        if self.vae is not None:
            self.vae.to(device)
        if self.pipe is not None:
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                enc = getattr(self.pipe, name, None)
                if enc is not None:
                    enc.to(device)
        return self


# ----------------------------------------------------------------------------------------------------------------
# The network adapter
# ----------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the features are read."""


def _run_until(module: nn.Module, run: Any) -> Any:
    box: dict[str, Any] = {}

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        box["out"] = out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in box:
        raise RuntimeError(f"{type(module).__name__} did not run")
    return box["out"]


def _pack(x: Tensor) -> Tensor:
    """Flux's 2x2 patch packing ``(B, C, H, W) -> (B, H/2 * W/2, 4C)`` (diffusers' ``_pack_latents``)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(x: Tensor, h: int, w: int) -> Tensor:
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


class DiffusersNet(nn.Module):
    """A diffusers denoiser behind the network protocol of :mod:`fewstep.diffusion.denoiser`:
    ``forward(x, c_noise, cond)``, ``features(x, c_noise, cond)``, ``null_cond(cond)``.

    Args:
        model: the diffusers model (trained; its weights are this module's ``model.*`` parameters).
        family: one of :data:`FAMILIES`' values.
        components: the shared pipeline components.
        null: the empty prompt's embeddings (text families), kept as non-persistent buffers.
        num_classes: classes of a class-conditional model (its null class is ``num_classes``).
        flux_guidance: the guidance-embedding value of a guidance-distilled Flux (``guidance_embeds``).
    """

    def __init__(self, model: nn.Module, family: str, components: Components, null: dict[str, Tensor] | None = None,
                 num_classes: int = 0, flux_guidance: float = 3.5) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.components = components
        self.num_classes = num_classes
        self.flux_guidance = flux_guidance
        self.null_keys: list[str] = []
        for k, v in (null or {}).items():
            self.register_buffer(f"null_{k}", v.float(), persistent=False)
            self.null_keys.append(k)
        self.in_channels = int(model.config.in_channels) // (4 if family == "flux" else 1)

    @property
    def text_conditional(self) -> bool:
        return self.family in TEXT_FAMILIES

    # --- conditions ------------------------------------------------------------------------------------------------
    def null_cond(self, cond: Any) -> Any:
        if self.text_conditional:
            n = next(iter(cond.values())).shape[0] if isinstance(cond, dict) else int(cond)
            nulls = {k: getattr(self, f"null_{k}") for k in self.null_keys}
            return {k: v.expand(n, *v.shape[1:]) for k, v in nulls.items()}
        if self.num_classes > 0:
            return torch.full_like(cond, self.num_classes)
        raise UserError("this model has no null condition; use guidance_scale 1 (no CFG)")

    def _cond(self, x: Tensor, cond: Any) -> Any:
        if self.text_conditional:
            c = self.null_cond(x.shape[0]) if cond is None else cond
            return {k: v.to(x.device, x.dtype) for k, v in c.items()}
        if self.family == "dit" and cond is None:
            return torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return cond

    # --- the model ------------------------------------------------------------------------------------------------
    def _call(self, x_in: Tensor, c_noise: Tensor, cond: Any) -> Tensor:
        m, fam = self.model, self.family
        # the model's own dtype in (a bf16 teacher fed float32 latents), the caller's dtype out
        x = x_in.to(next(m.parameters()).dtype)
        c = self._cond(x, cond)
        t = c_noise.to(x.device)
        if fam == "unet":
            out = m(x, t, class_labels=c).sample
        elif fam == "unet_cond":
            added = None
            if "text_embeds" in c:  # SDXL: (original size, crop top-left, target size) = the full image, uncropped
                scale = self.components.vae_scale if self.components.latent else 1
                h, w = x.shape[-2] * scale, x.shape[-1] * scale
                ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype).expand(x.shape[0], 6)
                added = {"text_embeds": c["text_embeds"], "time_ids": ids}
            out = m(x, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added).sample
        elif fam == "dit":
            out = m(x, timestep=t, class_labels=c).sample
        elif fam == "sd3":
            out = m(hidden_states=x, encoder_hidden_states=c["encoder_hidden_states"],
                    pooled_projections=c["pooled_projections"], timestep=t).sample
        elif fam == "flux":
            b, _, h, w = x.shape
            ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
            ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
            ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
            txt = c["encoder_hidden_states"]
            guidance = None
            if m.config.get("guidance_embeds", False):
                guidance = torch.full((b,), self.flux_guidance, device=x.device, dtype=x.dtype)
            out = m(hidden_states=_pack(x), encoder_hidden_states=txt, pooled_projections=c["pooled_projections"],
                    timestep=t / 1000, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(txt.shape[1], 3, device=x.device,
                                                                                        dtype=x.dtype),
                    guidance=guidance).sample
            out = _unpack(out, h, w)
        else:  # pragma: no cover - guarded at construction
            raise AssertionError(fam)
        return out[:, : self.in_channels].to(x_in.dtype)  # learned-variance models (DiT, iDDPM): [eps, variance]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        return self._call(x, c_noise, cond)

    def feature_module(self) -> nn.Module:
        m = self.model
        if self.family in ("unet", "unet_cond"):
            return m.mid_block if getattr(m, "mid_block", None) is not None else m.down_blocks[-1]
        blocks = m.transformer_blocks
        return blocks[(len(blocks) - 1) // 2]

    def features(self, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        out = _run_until(self.feature_module(), lambda: self._call(x, c_noise, cond))
        if isinstance(out, tuple):  # joint blocks return (text tokens, image tokens)
            out = out[1] if self.family in ("sd3", "flux") else out[0]
        if self.family in ("unet", "unet_cond"):
            return out.to(x.dtype)
        # image tokens (B, N, D) on their patch grid
        p = 2 if self.family == "flux" else int(self.model.config.patch_size)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w).to(x.dtype)

    # --- saving ---------------------------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What :func:`network_from_spec` needs to rebuild this network (weights apart), LoRA adapters included."""
        spec = {"type": FORMAT, "folder": str(self.components.folder.resolve()), "family": self.family,
                "class": type(self.model).__name__, "config": _jsonable(dict(self.model.config)),
                "num_classes": self.num_classes, "flux_guidance": self.flux_guidance}
        lora = lora_spec(self)
        if lora is not None:
            spec["lora"] = lora
        return spec


def lora_spec(net: nn.Module) -> dict[str, Any] | None:
    """The PEFT LoRA adapters injected into ``net`` (rank, alpha, targets per adapter), or None."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency of the hf extra
        return None
    adapters: dict[str, dict[str, Any]] = {}
    for name, m in net.named_modules():
        if isinstance(m, LoraLayer):
            for adapter, r in m.r.items():
                a = adapters.setdefault(adapter, {"targets": [], "ranks": {}, "alphas": {}})
                a["targets"].append(name)
                a["ranks"][name], a["alphas"][name] = int(r), float(m.lora_alpha[adapter])
    return adapters or None


def inject_lora(net: nn.Module, spec: dict[str, Any]) -> None:
    """Re-create the adapters described by :func:`lora_spec` (zero-initialised ``B``; the caller loads weights)."""
    from peft import LoraConfig, inject_adapter_in_model

    for adapter, a in spec.items():
        ranks, alphas = a["ranks"], a["alphas"]
        r0, al0 = next(iter(ranks.values())), next(iter(alphas.values()))
        cfg = LoraConfig(r=r0, lora_alpha=al0, target_modules=a["targets"],
                         rank_pattern={f"^{k}$": v for k, v in ranks.items() if v != r0},
                         alpha_pattern={f"^{k}$": v for k, v in alphas.items() if v != al0})
        inject_adapter_in_model(cfg, net, adapter_name=adapter)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# The denoiser
# ----------------------------------------------------------------------------------------------------------------
class DiffusersDenoiser(Denoiser):
    """A :class:`Denoiser` over a diffusers model, with the pipeline's text encoding and VAE at hand."""

    net: DiffusersNet

    @property
    def components(self) -> Components:
        return self.net.components

    @property
    def text_conditional(self) -> bool:
        return self.net.text_conditional

    @property
    def latent(self) -> bool:
        return self.components.latent

    @property
    def data_resolution(self) -> int:
        """The side of training images: the sample's side, times the VAE's factor for latent models."""
        side = int(self.sample_shape[-1])
        return side * self.components.vae_scale if self.latent else side

    def prompt_lookup(self, idx: Tensor) -> dict[str, Tensor]:
        """Prompt embeddings of the captions ``idx`` of the bank made by :func:`prepare_training_data`."""
        if self.components.prompts is None:
            raise UserError("this text-to-image teacher has no training prompts; give --data a folder with captions "
                            "(img.png + img.txt, or metadata.jsonl / captions.txt)")
        return self.components.prompts.lookup(idx)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.components.encode_prompts(prompts)

    def decode(self, x: Tensor) -> Tensor:
        """Samples as images in ``[-1, 1]``: decoded by the VAE for latent models, as they are otherwise."""
        return self.components.decode(x) if self.latent else x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _sample_shape(model: nn.Module, family: str, components: Components) -> tuple[int, int, int]:
    cfg = model.config
    size = cfg.get("sample_size", None)
    if family == "flux":
        pipe = components.pipe
        side_px = int(getattr(pipe, "default_sample_size", 128)) * (components.vae_scale if components.latent else 8)
        side = side_px // (components.vae_scale if components.latent else 8)
        return int(cfg.in_channels) // 4, side, side
    if size is None:
        raise UserError(f"{type(model).__name__} config has no sample_size; add it to its config.json")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)


def _num_classes(model: nn.Module, family: str) -> int:
    cfg = model.config
    if family == "dit":
        n = cfg.get("num_embeds_ada_norm")
        if not n:
            raise UserError(f"{type(model).__name__} without num_embeds_ada_norm is not a class-conditional DiT; "
                            "fewstep supports DiT-style Transformer2DModel (norm_type ada_norm_zero)")
        return int(n)
    if family == "unet" and cfg.get("num_class_embeds"):
        return int(cfg.num_class_embeds)
    if family == "unet_cond":
        extra = [k for k in ("class_embed_type", "num_class_embeds", "time_cond_proj_dim", "encoder_hid_dim_type")
                 if cfg.get(k) is not None] + (
            ["addition_embed_type"] if cfg.get("addition_embed_type") not in (None, "text_time") else [])
        if extra or cfg.get("out_channels") not in (cfg.get("in_channels"), 2 * cfg.get("in_channels")):
            what = ", ".join(extra) or "in_channels != out_channels (an inpainting or upscaling UNet)"
            raise UserError(f"this UNet2DConditionModel takes conditions fewstep does not supply ({what}); fewstep "
                            "distills text-to-image UNets (SD 1.x/2.x, SDXL)")
    return 0


def _null_condition(components: Components, family: str) -> dict[str, Tensor] | None:
    if family not in TEXT_FAMILIES:
        return None
    null = {k: v[:1] for k, v in components.encode_prompts([""]).items()}
    return {k: torch.zeros_like(v) for k, v in null.items()} if components.zero_null else null


def load_pipeline(folder: Path, **components: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a local folder, with absent optional components passed as None."""
    from diffusers import DiffusionPipeline

    comps = _check_pipeline_folder(folder)
    kwargs = {name: None for name, (lib, cls) in comps.items() if lib is None or cls is None}
    kwargs.update(components)
    from diffusers.utils import logging as diffusers_logging

    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # no "Loading pipeline components" bar: an error stays one line
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype; older ones only know torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 -- diffusers raises ValueError/OSError/ImportError/...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{folder}: diffusers cannot load this pipeline ({msg}); re-save it with save_pretrained"
                        ) from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()


def _model_class(name: str) -> Any:
    import diffusers

    if name not in FAMILIES:
        raise UserError(f"model class {name!r} is not supported; fewstep takes {', '.join(FAMILIES)}")
    return getattr(diffusers, name)


def _resolution_shape(shape: tuple[int, int, int], resolution: int, model: nn.Module, family: str,
                      components: Components) -> tuple[int, int, int]:
    scale = components.vae_scale if components.latent else 1
    cfg = model.config
    if family in ("unet", "unet_cond"):
        multiple = 2 ** (len(cfg.block_out_channels) - 1)
    else:
        multiple = 2 if family == "flux" else int(cfg.get("patch_size", 1) or 1)
    step = scale * multiple
    if resolution < 1 or resolution % step:
        raise UserError(f"resolution {resolution} is not a multiple of {step} (the VAE's factor {scale} times the "
                        f"model's {multiple}); pick e.g. {max(1, resolution // step) * step}")
    return shape[0], resolution // scale, resolution // scale


def load_diffusers(path: str | Path, model: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                   resolution: int | None = None) -> DiffusersDenoiser:
    """Load a diffusers folder (pipeline or bare model) as a frozen :class:`DiffusersDenoiser`.

    Args:
        path: the folder.
        model: use this denoiser model instead of the folder's (a student's architecture rebuilt from its config).
        dtype: the dtype of the denoiser model and the components.
        resolution: the image side to work at (default: the model's ``sample_size``, Flux: its pipeline's default,
            times the VAE's factor).
    """
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        comps = _check_pipeline_folder(folder)
        name = next(n for n in DENOISER_COMPONENTS if n in comps and comps[n][1])
        extra = {name: model} if model is not None else {}
        # what distillation never runs is not loaded (SD's safety checker alone is 1.2 GB); export keeps it
        extra.update({n: None for n in OPTIONAL_COMPONENTS if n in comps})
        if model is not None and next(model.parameters()).dtype != dtype:
            model.to(dtype)
        pipe = load_pipeline(folder, torch_dtype=dtype, **extra)
        net_model = getattr(pipe, name)
        family = FAMILIES.get(type(net_model).__name__)
        if family is None:
            raise UserError(f"{folder}: its {name} is a {type(net_model).__name__}; fewstep takes "
                            f"{', '.join(FAMILIES)}")
        sched_cfg = dict(pipe.scheduler.config)
        sched_cfg["_class_name"] = type(pipe.scheduler).__name__
        components = Components(folder, family, pipe, getattr(pipe, "vae", None))
    else:
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise UserError(missing_index_message(folder) or f"{folder} is not a diffusers folder: it needs "
                            "model_index.json (a pipeline) or config.json + weights (a model)")
        cls_name = _read_json(cfg_path).get("_class_name", "")
        cls = _model_class(cls_name)
        family = FAMILIES[cls_name]
        if family in TEXT_FAMILIES:
            raise UserError(f"{folder}: {cls_name} is text-conditional; give the pipeline folder (model_index.json "
                            "with its text encoders, tokenizers and VAE), not the bare model")
        sched_cfg = _scheduler_config_for_bare(folder)
        if model is None:
            if not any(p.suffix in (".safetensors", ".bin") for p in folder.iterdir()):
                raise UserError(f"{folder} holds no weights (*.safetensors); copy the model completely")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model = cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
            except Exception as e:  # noqa: BLE001
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"{folder}: diffusers cannot load this model ({msg}); copy it completely again or "
                                "re-save it with save_pretrained") from None
        net_model = model if model.dtype == dtype else model.to(dtype)
        components = Components(folder, family)
    return _wrap(net_model, family, components, sched_cfg, folder, resolution)


def _wrap(net_model: nn.Module, family: str, components: Components, sched_cfg: dict[str, Any], folder: Path,
          resolution: int | None) -> DiffusersDenoiser:
    net_model.eval().requires_grad_(False)
    shape = _sample_shape(net_model, family, components)
    if resolution is not None:
        shape = _resolution_shape(shape, int(resolution), net_model, family, components)
    schedule, prediction = schedule_from_scheduler_config(sched_cfg, family, shape)
    net = DiffusersNet(net_model, family, components, _null_condition(components, family),
                       _num_classes(net_model, family))
    den = DiffusersDenoiser(net, schedule, prediction, shape, net.num_classes)
    data = None
    if (folder / "fewstep_teacher.json").is_file():  # a teacher trained by `fewstep teacher train` records its data
        data = _read_json(folder / "fewstep_teacher.json").get("data")
    den.info = {"format": FORMAT, "meta": {"kind": "teacher", "teacher": str(folder), "data": data,
                                           "family": family, "class": type(net_model).__name__}}
    return den.eval().requires_grad_(False)


def denoiser_from_pipeline(pipe: Any, folder: str | Path) -> DiffusersDenoiser:
    """A frozen :class:`DiffusersDenoiser` over an in-memory pipeline that is (or will be) saved at ``folder``:
    what ``fewstep teacher train`` trains before the pipeline exists on disk (its students record ``folder``)."""
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    net_model = getattr(pipe, name)
    family = FAMILIES[type(net_model).__name__]
    sched_cfg = dict(pipe.scheduler.config)
    sched_cfg["_class_name"] = type(pipe.scheduler).__name__
    components = Components(Path(folder), family, pipe, getattr(pipe, "vae", None))
    return _wrap(net_model, family, components, sched_cfg, Path(folder), None)


def network_from_spec(spec: dict[str, Any]) -> tuple[DiffusersNet, Components]:
    """Rebuild a saved diffusers network (random weights: the caller loads the state) with its teacher's
    components."""
    folder = Path(spec["folder"])
    if not folder.is_dir():
        raise UserError(f"this model was distilled from the diffusers folder {folder}, which is gone; put the teacher "
                        "folder back there (its VAE and text encoders are loaded from it)")
    cls = _model_class(spec["class"])
    model = cls.from_config(spec["config"])
    den = load_diffusers(folder, model=model)
    return den.net, den.components


def denoiser_from_description(desc: dict[str, Any]) -> DiffusersDenoiser:
    """The denoiser of a saved description whose network is a diffusers model (weights not loaded)."""
    from ..diffusion.schedule import schedule_from_config

    net, _ = network_from_spec(desc["network"])
    net.flux_guidance = float(desc["network"].get("flux_guidance", 3.5))
    if desc["network"].get("lora"):  # a LoRA student: the same adapters, so its saved state loads as it is
        inject_lora(net, desc["network"]["lora"])
        net.requires_grad_(False)
    return DiffusersDenoiser(net, schedule_from_config(desc["schedule"]), desc["prediction_type"],
                             tuple(desc["sample_shape"]), desc.get("num_classes", 0))


# ----------------------------------------------------------------------------------------------------------------
# Training data for a diffusers teacher
# ----------------------------------------------------------------------------------------------------------------
class TrainingData:
    """What the training loop reads: ``x`` (pixels or latents) and ``labels`` (class labels, or caption indices into
    the teacher's prompt bank for text-to-image teachers)."""

    def __init__(self, x: Tensor, labels: Tensor | None, name: str) -> None:
        self.x, self.labels, self.name = x, labels, name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fewstep" / "diffusers"


def prepare_training_data(teacher: DiffusersDenoiser, dataset: Any,
                          cache_dir: str | Path | None = None) -> TrainingData:
    """Images -> the teacher's space (VAE latents, cached), captions -> the teacher's prompt bank (cached).

    Args:
        teacher: the diffusers teacher.
        dataset: a :class:`fewstep.data.Dataset` of images at ``teacher.data_resolution``.
        cache_dir: where encoded latents and prompts are kept (default ``~/.cache/fewstep/diffusers``).
    """
    if getattr(dataset, "kind", "image") != "image":
        raise UserError(f"a diffusers teacher is trained on images; {dataset.name} holds points")
    try:
        teacher.components.to(_encoding_device())
        return _prepare(teacher, dataset, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    finally:
        teacher.components.to("cpu")


def _prepare(teacher: DiffusersDenoiser, dataset: Any, cache: Path) -> TrainingData:
    x = dataset.x
    want_c = teacher.components.vae.config.in_channels if teacher.latent else teacher.sample_shape[0]
    if x.shape[1] != want_c:
        if x.shape[1] == 1 and want_c == 3:
            x = x.repeat(1, 3, 1, 1)
        else:
            raise UserError(f"{dataset.name} has {x.shape[1]}-channel images but the teacher takes {want_c}")
    if teacher.latent:
        key = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
        vae_key = hashlib.sha256(str(teacher.components.folder.resolve()).encode()).hexdigest()[:8]
        path = cache / f"latents_{vae_key}_{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            x = load_file(path)["latents"]
        else:
            x = teacher.components.encode_images(x)
            from safetensors.torch import save

            from ..io import atomic_write_bytes

            atomic_write_bytes(path, save({"latents": x.contiguous()}))
    labels = None
    captions = getattr(dataset, "captions", None)
    if teacher.text_conditional:
        if captions is None:
            raise UserError(f"{dataset.name} has no captions, but the teacher is text-to-image; put a caption next to "
                            "each image (img.png + img.txt) or a metadata.jsonl / captions.txt in the folder")
        teacher.components.prompt_bank(list(captions), cache)
        labels = torch.arange(len(captions))
    elif teacher.num_classes > 0:
        if dataset.labels is not None:
            labels = dataset.labels
            if int(labels.max()) >= teacher.num_classes:
                raise UserError(f"{dataset.name} has {int(labels.max()) + 1} classes but the teacher has "
                                f"{teacher.num_classes}")
    if tuple(x.shape[1:]) != tuple(teacher.sample_shape):
        raise UserError(f"{dataset.name} gives samples of shape {tuple(x.shape[1:])} but the teacher works on "
                        f"{tuple(teacher.sample_shape)}; use images of {teacher.data_resolution} px")
    return TrainingData(x, labels, dataset.name)


def _encoding_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_training_folder(teacher: DiffusersDenoiser, folder: str | Path, split: str = "train",
                            cache_dir: str | Path | None = None, chunk: int = 32) -> TrainingData:
    """An image folder -> the teacher's space, streamed: images are decoded and VAE-encoded ``chunk`` at a time (a
    folder of 1024 px images never sits in memory as pixels), latents cached on disk; captions -> the prompt bank.

    The text encoders and the VAE run on the GPU when there is one, and go back to the CPU afterwards.
    """
    from ..data.folder import folder_split_files, iter_image_folder

    folder = Path(folder)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    comps = teacher.components
    files, captions = folder_split_files(folder, split)
    res = teacher.data_resolution
    channels = int(comps.vae.config.in_channels) if teacher.latent else int(teacher.sample_shape[0])
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([stamp, res, channels, str(comps.folder.resolve()), teacher.latent]).encode())
    path = cache / f"data_{key.hexdigest()[:20]}.safetensors"
    labels = None
    device = _encoding_device()
    try:
        comps.to(device)
        if path.is_file():
            from safetensors.torch import load_file

            stored = load_file(path)
            x, labels = stored["x"], stored.get("labels")
        else:
            xs, ys = [], []
            for xb, yb in iter_image_folder(folder, split, res, channels, chunk):
                xs.append(comps.encode_images(xb) if teacher.latent else xb)
                if yb is not None:
                    ys.append(yb)
            x = torch.cat(xs)
            labels = torch.cat(ys) if ys else None
            from safetensors.torch import save

            from ..io import atomic_write_bytes

            atomic_write_bytes(path, save({"x": x.contiguous(), **({} if labels is None else {"labels": labels})}))
        if teacher.text_conditional:
            if captions is None:
                raise UserError(f"{folder} has no captions, but the teacher is text-to-image; put a caption next to "
                                "each image (img.png + img.txt) or a metadata.jsonl / captions.txt in the folder")
            comps.prompt_bank(captions, cache)
            labels = torch.arange(len(captions))
        elif teacher.num_classes == 0:
            labels = None
        elif labels is not None and int(labels.max()) >= teacher.num_classes:
            raise UserError(f"{folder} has {int(labels.max()) + 1} classes but the teacher has {teacher.num_classes}")
    finally:
        comps.to("cpu")
    return TrainingData(x, labels, str(folder))


@torch.no_grad()
def generate_images(model: Any, prompts: list[str], seed: int = 0, steps: int = 32, sampler: str = "heun",
                    cfg_scale: float = 1.0) -> Tensor:
    """Images in ``[-1, 1]`` for ``prompts`` from a text-to-image teacher or student, one per prompt.

    A student samples in its own steps with its own sampler (re-noising, or ODE steps for Lightning's); a teacher
    with ``sampler``/``steps``/``cfg_scale`` (the empty prompt is CFG's negative).
    """
    from ..diffusion.denoiser import guided
    from ..diffusion.samplers import initial_noise, sample, sample_ddim, sample_student

    den = getattr(model, "generator", model)
    if not isinstance(den, DiffusersDenoiser) or not den.text_conditional:
        raise UserError("prompts are for text-to-image diffusers models; sample this one without --prompt")
    if not prompts:
        raise UserError("give at least one prompt")
    device = next(den.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((len(prompts), *den.sample_shape), generator=gen).to(device)
    cond = {k: v.to(device) for k, v in den.encode_prompts(list(prompts)).items()}
    if den is model:  # a teacher
        x = sample(guided(den, cfg_scale), z, steps, sampler, cond=cond)
    elif "ode" in (getattr(model, "sampler", None), getattr(model, "info", {}).get("meta", {}).get("sampler")):
        ts = torch.cat([model.timesteps.cpu(), torch.tensor([den.schedule.t_clean])]).to(device)
        x = sample_ddim(den, initial_noise(den.schedule, z, ts[0]), ts, cond)
    else:
        x = sample_student(den, z, model.timesteps.to(device), cond, generator=gen)
    return den.decode(x.cpu())


def image_shape(model: Any) -> tuple[int, ...]:
    """The shape of one sample as an image: the VAE's image for latent diffusers models, the sample otherwise."""
    den = getattr(model, "generator", model)
    den = getattr(den, "denoiser", den)
    if isinstance(den, DiffusersDenoiser) and den.latent:
        return int(den.components.vae.config.out_channels), den.data_resolution, den.data_resolution
    return tuple(model.sample_shape)


def decode_samples(model: Any, x: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` from a model's samples (VAE-decoded for latent diffusers models)."""
    den = getattr(model, "generator", model)
    den = getattr(den, "denoiser", den)
    return den.decode(x) if isinstance(den, DiffusersDenoiser) else x


__all__ = ["FAMILIES", "Components", "DiffusersNet", "DiffusersDenoiser", "PromptBank", "TrainingData",
           "decode_samples", "denoiser_from_pipeline", "generate_images", "image_shape", "is_diffusers_folder", "load_diffusers", "network_from_spec", "prepare_training_data",
           "prepare_training_folder", "schedule_from_scheduler_config"]
