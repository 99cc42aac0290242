"""Teacher training: the one-player method "denoise", and the function behind ``fewstep teacher train``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import TeacherConfig
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedule import schedule_from_config
from ..errors import UserError
from ..methods.base import Batch, Method, Player, batch_cond, warmup_schedule
from ..models import build_network, save_denoiser
from ..models.text_unet import DEFAULTS as TEXT_DEFAULTS
from ..models.text_unet import TEXT_TEACHER_META, TEXT_UNET, is_text_unet_spec
from .loop import check_run_dir, set_aside, train


class DenoisingObjective(nn.Module):
    """A denoiser whose ``forward`` is its per-sample training loss.

    The loop prepares a player's module with Accelerate, which under ``accelerate launch`` wraps it in
    ``DistributedDataParallel``; DDP only synchronises gradients of graphs built through the wrapper's ``forward``
    (and Accelerate's mixed-precision patch sits on ``forward`` too). Calling ``denoiser.denoising_loss`` on the
    unwrapped module would bypass both, so the teacher's player is this thin module instead.
    """

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Any = None) -> Tensor:
        return self.denoiser.denoising_loss(x0, t, eps, cond)


class TeacherMethod(Method):
    """Denoising score matching in the network's own parameterisation (eps-/v-/flow-/F-MSE; see
    :meth:`Denoiser.denoising_loss`), with label dropout to the null class so that the teacher supports
    classifier-free guidance.

    Args:
        denoiser: the (untrained) denoiser.
        cfg: the teacher config (optimizer, warm-up, EMA, clipping, label dropout).
    """

    def __init__(self, denoiser: Denoiser, cfg: TeacherConfig) -> None:
        self.label_dropout = float(cfg.label_dropout)
        objective = DenoisingObjective(denoiser)
        optimizer = torch.optim.AdamW(
            objective.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay
        )
        self.players = {
            "denoiser": Player(
                module=objective,
                optimizer=optimizer,
                lr_scheduler=warmup_schedule(optimizer, cfg.warmup_iterations),
                grad_clip=cfg.grad_clip,
                ema_decay=cfg.ema_decay,
            )
        }
        self._denoiser = denoiser  # the unwrapped training copy (same parameters as the player's module)

    def loss(self, player: str, batch: Batch, it: int) -> tuple[Tensor, dict[str, float]]:
        assert player == "denoiser", player
        x0 = batch.x0
        n = x0.shape[0]
        t = self._denoiser.schedule.sample_train_t(n, device=x0.device)
        eps = torch.randn_like(x0)
        cond = batch_cond(batch, self._denoiser)  # class labels, or a text teacher's prompt embeddings
        if cond is not None and self.label_dropout > 0:  # to the null class / the empty prompt (CFG)
            drop = torch.rand(n, device=x0.device) < self.label_dropout
            cond = _where(drop, self._denoiser.null_cond(cond), cond)
        per_sample = self.players["denoiser"].module(x0, t, eps, cond)
        return per_sample.mean(), {}

    def inference_model(self) -> Denoiser:
        """The EMA denoiser (the training weights before the loop has attached an EMA)."""
        ema = self.players["denoiser"].ema
        return ema.denoiser if ema is not None else self._denoiser


def _where(drop: Tensor, null: Any, cond: Any) -> Any:
    """``null`` where ``drop`` else ``cond``, per sample, for a tensor or a dict of tensors."""
    if isinstance(cond, dict):
        return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null[k].to(v), v) for k, v in cond.items()}
    return torch.where(drop, null, cond)


# ----------------------------------------------------------------------------------------------------------------
# From a config
# ----------------------------------------------------------------------------------------------------------------
def _data_num_classes(dataset: Any) -> int:
    if getattr(dataset, "labels", None) is None:
        return 0
    return int(getattr(dataset, "num_classes", 0) or 0)


def resolve_teacher_config(cfg: TeacherConfig, dataset: Any) -> TeacherConfig:
    """``cfg`` with the network spec and resolution filled in from the data (what ``config.yaml`` records)."""
    kind = getattr(dataset, "kind", None)
    shape = tuple(getattr(dataset, "sample_shape", tuple(dataset.x.shape[1:])))
    classes = _data_num_classes(dataset)
    if kind is None:
        kind = "image" if len(shape) == 3 else "points"
    if is_text_unet_spec(cfg.network):  # the diffusers text-to-image teacher (fewstep.models.text_unet)
        if kind != "image" or len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(f"a text-to-image teacher is trained on square images, not samples of shape {shape}")
        if getattr(dataset, "captions", None) is None:
            raise UserError(f"{getattr(dataset, 'name', 'the data')} has no captions, but network.type "
                            f"{TEXT_UNET} is text-to-image; use captioned data (shapes, or a folder with img.txt "
                            "captions)")
        return cfg.model_copy(update={"network": {**TEXT_DEFAULTS, **cfg.network}, "resolution": shape[1]})
    if kind == "image":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(f"image data must be square (C, R, R), got samples of shape {shape}")
        defaults: dict[str, Any] = {"type": "unet", "base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2,
                                    "num_classes": classes, "in_channels": shape[0], "resolution": shape[1]}
        resolution = shape[1]
    elif kind == "points":
        if len(shape) != 1:
            raise UserError(f"point data must be (N, D), got samples of shape {shape}")
        defaults = {"type": "mlp", "width": 128, "depth": 4, "dim": shape[0], "num_classes": classes}
        resolution = None
    else:
        raise UserError(f"unknown data kind {kind!r}; expected 'image' or 'points'")
    if cfg.network is None:
        network = defaults
    else:  # a user's spec: fill in only what the data determines, and what the user left out
        data_keys = {"unet": ("in_channels", "resolution", "num_classes"), "mlp": ("dim", "num_classes")}
        net_type = cfg.network.get("type", defaults["type"])
        filled = {k: defaults[k] for k in data_keys.get(net_type, ()) if k in defaults}
        network = {"type": net_type, **filled, **cfg.network}
    return cfg.model_copy(update={"network": network, "resolution": resolution})


def build_teacher_denoiser(cfg: TeacherConfig, sample_shape: tuple[int, ...]) -> Denoiser:
    """The untrained denoiser of a resolved config (the caller seeds torch first for a reproducible init)."""
    assert cfg.network is not None, "resolve the config first"
    try:
        schedule = schedule_from_config(cfg.schedule)
    except (TypeError, ValueError) as e:
        raise UserError(f"schedule: {e}") from None
    try:
        net = build_network(cfg.network)
    except TypeError as e:
        raise UserError(f"network: {e}") from None
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"network: {e}") from None
    num_classes = int(cfg.network.get("num_classes", 0) or 0)
    return Denoiser(net, schedule, cfg.prediction_type, tuple(sample_shape), num_classes)


def teacher_sample_writer(data: str | None, steps: int = 16, sampler: str = "heun") -> Callable[[Denoiser, Path], None]:
    """A ``sample_fn`` for :func:`train_teacher`: a grid of 100 images (10 per class) or a 2,000-point scatter."""

    def write(denoiser: Denoiser, path: Path) -> None:
        from ..diffusion.samplers import sample
        from ..eval.images import save_samples

        n = 100 if len(denoiser.sample_shape) == 3 else 2000
        gen = torch.Generator().manual_seed(1234)
        device = next(denoiser.parameters()).device
        z = torch.randn((n, *denoiser.sample_shape), generator=gen).to(device)
        labels = torch.arange(n, device=device) % denoiser.num_classes if denoiser.num_classes > 0 else None
        with torch.no_grad():  # balanced classes, as fewstep.api.generate
            x = sample(denoiser, z, steps, sampler, cond=labels, generator=gen)
        save_samples(x.cpu(), path, data, title=f"{sampler}, {steps} steps")

    return write


def train_teacher(
    cfg: TeacherConfig,
    out_dir: str | Path,
    resume: bool = False,
    dataset: Any = None,
    sample_fn: Callable[[Denoiser, Path], None] | None = None,
    restart: bool = False,
) -> Path:
    """Train a teacher and save its EMA denoiser as ``out_dir/model.safetensors`` + ``out_dir/model.json``.

    Args:
        cfg: the teacher config (unresolved parts are filled in from the data).
        out_dir: the run directory (new or empty unless ``resume`` or ``restart``).
        resume: continue the run in ``out_dir`` from its newest checkpoint that loads; refused when there is none
            or when ``cfg`` (resolved) differs from the checkpoint's (see :func:`fewstep.train.loop.train`).
        dataset: the training data (default: ``fewstep.data.load_data(cfg.data, "train", cfg.resolution)``).
        sample_fn: ``sample_fn(ema_denoiser, path)`` writes a sample grid; called every ``loop.sample_every``
            iterations and at the end.
        restart: move an existing ``out_dir`` aside (``<out_dir>.before-restart-<UTC time>``; nothing is deleted)
            once the data and config are checked, and start a new run there.

    Returns:
        The saved model's path prefix ``out_dir/"model"`` (for :func:`fewstep.models.load_denoiser`); for the
        text-to-image network (``network.type`` ``unet2d_condition``) ``out_dir`` itself, a diffusers pipeline folder
        (for :func:`fewstep.load_teacher`).
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir, resume, restart)  # before loading data: fail fast
    if dataset is None:
        from ..data import load_data

        dataset = load_data(cfg.data, "train", cfg.resolution)
    cfg = resolve_teacher_config(cfg, dataset)
    shape = tuple(getattr(dataset, "sample_shape", tuple(dataset.x.shape[1:])))
    if is_text_unet_spec(cfg.network):
        return _train_text_teacher(cfg, out_dir, dataset, shape, resume, restart, sample_fn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loop.seed)  # the initial weights are a function of the seed
        denoiser = build_teacher_denoiser(cfg, shape)
    method = TeacherMethod(denoiser, cfg)

    loop_sample_fn = None
    if sample_fn is not None:
        def loop_sample_fn(step: int, path: Path) -> None:
            sample_fn(method.inference_model(), path)

    if restart:
        set_aside(out_dir)
    train(method, dataset, cfg.loop, out_dir, resume=resume, sample_fn=loop_sample_fn, config=cfg)

    from accelerate import PartialState

    prefix = out_dir / "model"
    if PartialState().is_main_process:
        save_denoiser(
            method.inference_model(), prefix, data=cfg.data, resolution=cfg.resolution,
            iterations=cfg.loop.iterations, seed=cfg.loop.seed,
        )
    PartialState().wait_for_everyone()
    return prefix


# ----------------------------------------------------------------------------------------------------------------
# The text-to-image teacher: a diffusers pipeline, trained through the same method and loop
# ----------------------------------------------------------------------------------------------------------------
def text_sample_writer(prompts: list[str], steps: int = 16, sampler: str = "heun",
                       cfg_scale: float = 3.0) -> Callable[[Denoiser, Path], None]:
    """A ``sample_fn`` for a text-to-image teacher: one image per prompt (the same prompts at every step)."""

    def write(denoiser: Denoiser, path: Path) -> None:
        from ..eval.images import save_samples
        from ..models.hf import generate_images

        x = generate_images(denoiser, prompts, seed=1234, steps=steps, sampler=sampler, cfg_scale=cfg_scale)
        save_samples(x, path, None)

    return write


def grid_prompts(dataset: Any, n: int = 40) -> list[str]:
    """Prompts of a text teacher's sample grids: for shapes, 30 seen and 10 held-out compositions; else the first
    ``n`` captions."""
    if getattr(dataset, "name", None) == "shapes":
        from ..data.shapes import heldout_prompts, seen_prompts

        return seen_prompts()[:: len(seen_prompts()) // 30][:30] + heldout_prompts()[:: 3][:10]
    return list(dataset.captions[:n])


def save_text_teacher(denoiser: Any, pipe: Any, out_dir: Path, data: str | None) -> None:
    """Save the trained UNet (``denoiser``'s, the EMA) into ``pipe`` and the pipeline to ``out_dir`` (diffusers'
    ``save_pretrained``), with the training data's name in ``fewstep_teacher.json``."""
    import json

    from ..io import atomic_write_json

    pipe.unet.load_state_dict(denoiser.net.model.state_dict())
    pipe.save_pretrained(str(out_dir))
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("vae", "safety_checker", "feature_extractor", "image_encoder"):  # the absent ones, named
        index.setdefault(name, [None, None])
    atomic_write_json(index_path, index)
    atomic_write_json(out_dir / TEXT_TEACHER_META, {"data": data})


def _train_text_teacher(cfg: TeacherConfig, out_dir: Path, dataset: Any, shape: tuple[int, ...], resume: bool,
                        restart: bool, sample_fn: Callable[[Denoiser, Path], None] | None) -> Path:
    from accelerate import PartialState

    from ..models.hf import denoiser_from_pipeline, prepare_training_data
    from ..models.text_unet import build_text_pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loop.seed)  # the initial weights are a function of the seed
        pipe = build_text_pipeline(cfg.network, int(shape[1]), int(shape[0]), cfg.schedule, cfg.prediction_type)
    denoiser = denoiser_from_pipeline(pipe, out_dir)  # its students record out_dir, where the pipeline is saved
    data = prepare_training_data(denoiser, dataset)  # the captions -> the prompt bank; labels = caption indices
    denoiser.requires_grad_(True)
    method = TeacherMethod(denoiser, cfg)
    writer = text_sample_writer(grid_prompts(dataset)) if sample_fn is not None else None

    def loop_sample_fn(step: int, path: Path) -> None:
        writer(method.inference_model(), path)

    if restart:
        set_aside(out_dir)
    train(method, data, cfg.loop, out_dir, resume=resume, sample_fn=loop_sample_fn if writer else None, config=cfg)
    if PartialState().is_main_process:
        save_text_teacher(method.inference_model(), pipe, out_dir, cfg.data)
    PartialState().wait_for_everyone()
    return out_dir
