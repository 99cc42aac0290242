"""Embedded networks and the saving/loading of denoisers (safetensors weights + a JSON description)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import schedule_from_config
from ..errors import UserError
from ..io import atomic_write, atomic_write_json
from .mlp import PointMLP
from .unet import ClassUNet

NETWORKS: dict[str, type[nn.Module]] = {"unet": ClassUNet, "mlp": PointMLP}
FORMAT = "fewstep-denoiser"


def build_network(spec: dict[str, Any]) -> nn.Module:
    """Build one of our networks from ``{"type": "unet" | "mlp", **kwargs}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in NETWORKS:
        raise UserError(f"unknown network type {kind!r}; use one of {sorted(NETWORKS)}")
    return NETWORKS[kind](**spec)


def network_spec(net: nn.Module) -> dict[str, Any]:
    if hasattr(net, "spec"):  # a diffusers model behind its adapter (fewstep.models.hf)
        return net.spec()
    for name, cls in NETWORKS.items():
        if type(net) is cls:
            return {"type": name, **net.config}
    raise TypeError(f"{type(net).__name__} is not one of fewstep's embedded networks; put your own module behind "
                    "fewstep.wrap(module, ...) to save it")


def describe(denoiser: Denoiser, **meta: Any) -> dict[str, Any]:
    """The JSON description saved next to a denoiser's weights."""
    return {
        "format": FORMAT,
        "version": 1,
        "network": network_spec(denoiser.net),
        "schedule": denoiser.schedule.to_config(),
        "prediction_type": denoiser.prediction_type,
        "sample_shape": list(denoiser.sample_shape),
        "num_classes": denoiser.num_classes,
        "meta": meta,
    }


def save_denoiser(denoiser: Denoiser, path: str | Path, **meta: Any) -> Path:
    """Write ``path.safetensors`` and ``path.json`` (``path`` without suffix), each atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.net.state_dict().items()}
    weights = path.with_suffix(".safetensors")

    def write(f: Any) -> None:
        from safetensors.torch import save

        f.write(save(state))

    atomic_write(weights, write)
    atomic_write_json(path.with_suffix(".json"), describe(denoiser, **meta))
    return weights


def denoiser_from_description(desc: dict[str, Any], module: nn.Module | None = None) -> Denoiser:
    """The denoiser a description describes (weights apart); ``module``: the user's fresh module of a wrapped one
    (:func:`fewstep.wrap`)."""
    kind = desc["network"].get("type")
    if kind == "module":
        from .module import denoiser_from_description as from_module

        return from_module(desc, module)
    if module is not None:
        raise UserError(f"module= is for models of a wrapped network (fewstep.wrap); this one is fewstep's {kind!r} "
                        "network: drop module=")
    if kind == "diffusers":
        from .hf import denoiser_from_description as from_diffusers

        return from_diffusers(desc)
    net = build_network(desc["network"])
    schedule = schedule_from_config(desc["schedule"])
    return Denoiser(net, schedule, desc["prediction_type"], tuple(desc["sample_shape"]), desc.get("num_classes", 0))


def load_denoiser(path: str | Path, module: nn.Module | None = None) -> tuple[Denoiser, dict[str, Any]]:
    """Load a denoiser written by :func:`save_denoiser`; returns it (in eval mode) and its description. ``module``:
    a fresh module for a wrapped network saved without its constructor's arguments (:func:`fewstep.wrap`)."""
    path = Path(path)
    desc_path, weights = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (desc_path, weights):
        if not p.is_file():
            raise UserError(f"{p} not found: a saved denoiser is a .safetensors file with a .json beside it")
    try:
        desc = json.loads(desc_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{desc_path} is not readable JSON ({e}); re-create it or point at another model") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        found = desc.get("format") if isinstance(desc, dict) else type(desc).__name__
        raise UserError(f"{desc_path} is not a fewstep denoiser description (format {found!r}); point at the .json "
                        "that fewstep saved beside the .safetensors")
    try:
        den = denoiser_from_description(desc, module)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{desc_path} is damaged: its description of the network does not build one "
                        f"({type(e).__name__}: {e}); copy the model again from where it was saved") from None
    try:
        state = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); it is truncated or damaged: copy it "
                        "again from where it was saved") from None
    try:
        den.net.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys, size mismatches: another model's weights
        raise UserError(f"{weights} holds weights of another network than {desc_path.name} describes "
                        f"({_first_state_dict_error(e)}); copy the .safetensors and .json of the same model") from None
    den.eval().requires_grad_(False)
    return den, desc


def _first_state_dict_error(e: RuntimeError) -> str:
    """The first problem ``load_state_dict`` lists (one key, one shape), in one line."""
    import re

    lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e).strip()]
    first = lines[0]
    keys = re.match(r'((?:Missing|Unexpected) key\(s\) in state_dict): ("[^"]*")(, )?', first)
    if keys:
        more = first.count('", "')
        first = f"{keys.group(1)}: {keys.group(2)}" + (f" and {more} more" if more else "")
    return first.rstrip(".") + (f"; and {len(lines) - 1} more mismatches" if len(lines) > 1 else "")


__all__ = ["ClassUNet", "PointMLP", "build_network", "save_denoiser", "load_denoiser", "describe", "network_spec"]
