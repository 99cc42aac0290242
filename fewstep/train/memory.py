"""Memory and sharding helpers of the training loop: frozen weights in the training dtype, gradient checkpointing,
and player state (weights + optimizer) gathered from and scattered to FSDP shards.

* :func:`cast_frozen_parameters` -- every parameter nobody trains (the frozen teacher, a LoRA player's base weights,
  frozen feature networks) is held in the mixed-precision dtype during training, as diffusers' training scripts do
  ("cast all non-trainable weights to half-precision as these weights are only used for inference"); trained
  parameters, their optimizer state and the EMA stay in float32. The original dtypes come back after training, so
  evaluation and export outside autocast see the dtypes they were loaded in (holding the bf16-rounded values training
  used).
* :func:`enable_gradient_checkpointing` (from :mod:`fewstep.models.checkpointing`) -- recompute activations in the backward pass on every network of a player
  that supports it (diffusers models, our :class:`~fewstep.models.unet.ClassUNet`).
* :func:`player_state` / :func:`load_player_state` -- a player's module and optimizer state. Unsharded (one process,
  DDP): the module's ``state_dict`` and the optimizer's index-keyed ``state_dict``, as before. Sharded (FSDP 1 or
  2): ``torch.distributed.checkpoint.state_dict.get_state_dict`` with ``full_state_dict=True, cpu_offload=True``
  gathers the *full* weights and the full optimizer state (keyed by parameter name) on rank 0; on resume every
  process reads the file and ``set_state_dict`` scatters it back into its shards. So FSDP checkpoints carry the
  optimizer state and resume from it (the public DMD2 code saves weights only).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..models.checkpointing import enable_gradient_checkpointing  # noqa: F401  (the loop's import; lives below methods)

#: how a checkpoint's optimizer state is keyed: "index" (torch's own ``Optimizer.state_dict``) or "fqn" (parameter
#: names, torch.distributed.checkpoint's full state dict, written under FSDP)
INDEX, FQN = "index", "fqn"


# ----------------------------------------------------------------------------------------------------------------
# Frozen weights in the training dtype
# ----------------------------------------------------------------------------------------------------------------
def training_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The low-precision dtype frozen weights are held in, or None (no mixed precision, or fp16 on a CPU)."""
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16" and device.type != "cpu":
        return torch.float16
    return None


def modules_of(obj: Any, _seen: set[int] | None = None) -> list[nn.Module]:
    """Every ``nn.Module`` a method holds: its attributes, recursing into wrapped methods (DisBack's ``base``),
    dicts, lists and the players' ``module``. Unwrapped modules only need to be found once (parameters are
    deduplicated by the caller)."""
    from ..methods.base import Method, Player

    seen = _seen if _seen is not None else set()
    found: list[nn.Module] = []
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        return [obj]
    if isinstance(obj, Player):
        return modules_of(obj.module, seen)
    if isinstance(obj, Method):
        values: Iterable[Any] = vars(obj).values()
    elif isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return found
    for v in values:
        found.extend(modules_of(v, seen))
    return found


def cast_frozen_parameters(
    modules: Iterable[nn.Module], dtype: torch.dtype, keep: Iterable[nn.Parameter] = ()
) -> Callable[[Iterable[nn.Module]], None]:
    """Cast every floating-point parameter with ``requires_grad=False`` in ``modules`` to ``dtype`` (in place),
    except those in ``keep`` (the parameters the players' optimizers hold: a method may unfreeze them later, as
    Lightning does between its phases).

    Returns ``restore(extra_modules)``: it casts those parameters back to their original dtypes, and in
    ``extra_modules`` (EMA copies made after the cast) every parameter left in ``dtype`` back to float32.
    Buffers (schedule tables, normalisation statistics) are left alone.
    """
    original: dict[int, tuple[nn.Parameter, torch.dtype]] = {}
    kept = {id(p) for p in keep}
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if p.requires_grad or id(p) in kept or not p.is_floating_point() or id(p) in original \
                        or p.dtype == dtype:
                    continue
                original[id(p)] = (p, p.dtype)
                p.data = p.data.to(dtype)

    def restore(extra_modules: Iterable[nn.Module] = ()) -> None:
        with torch.no_grad():
            for p, old in original.values():
                if p.dtype != old:
                    p.data = p.data.to(old)
            for module in extra_modules:
                for p in module.parameters():
                    if p.dtype == dtype:
                        p.data = p.data.float()

    return restore


def optimizer_parameters(optimizers: Iterable[Any]) -> list[nn.Parameter]:
    """Every parameter the (possibly Accelerate-wrapped) optimizers hold."""
    return [p for opt in optimizers for group in _raw_optimizer(opt).param_groups for p in group["params"]]


def count_parameters(modules: Iterable[nn.Module]) -> dict[str, int]:
    """``{"trainable": n, "frozen": n}`` over distinct parameters (numbers of elements)."""
    seen: set[int] = set()
    out = {"trainable": 0, "frozen": 0}
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out["trainable" if p.requires_grad else "frozen"] += p.numel()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Player state, sharded or not
# ----------------------------------------------------------------------------------------------------------------
def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def _plain(module: nn.Module) -> nn.Module:
    while hasattr(module, "module") and isinstance(module.module, nn.Module):  # DDP
        module = module.module
    return getattr(module, "_orig_mod", module)  # torch.compile


def is_sharded_module(module: nn.Module) -> bool:
    """True when ``module`` (or a submodule) is FSDP-wrapped: FSDP1's wrapper or FSDP2's ``fully_shard``."""
    for m in module.modules():
        name = type(m).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return True
    return False


#: block classes that become FSDP units of their own (ours and diffusers'): the all-gather granularity
FSDP_BLOCKS = ("ResBlock", "Attention", "ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock",
               "FluxTransformerBlock", "FluxSingleTransformerBlock", "Downsample2D", "Upsample2D")
#: Denoiser methods the methods call besides forward: they gather the denoiser's weights too
DENOISER_ENTRY_POINTS = ("features", "denoising_loss")


def _units(module: nn.Module) -> list[nn.Module]:
    """The children of ``module`` that hold parameters, looking through ModuleList/ModuleDict (no forward)."""
    out = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out.extend(_units(child))
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


def shard_player(module: nn.Module, optimizer: Any, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard a player over the processes with FSDP2 (``fully_shard``), so that methods keep working unchanged.

    Units, innermost first: every block in :data:`FSDP_BLOCKS`; every denoiser (with :data:`DENOISER_ENTRY_POINTS`
    registered as forward methods, so ``fake.features(...)`` gathers its weights like ``fake(...)`` does); every
    child of the player holding parameters (heads); the player itself. The root then owns no parameters of its own,
    so a method may call a player's parts directly (DMD2 reads the fake score in the generator's loss) without going
    through the player's forward. The optimizer is pointed at the sharded parameters (same names, new tensors).

    Args:
        module: the player's module (unwrapped, on its device).
        optimizer: its optimizer (no state yet).
        param_dtype: all-gather the weights in this dtype (mixed precision), gradients reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ..diffusion.denoiser import Denoiser

    names = {id(p): n for n, p in module.named_parameters()}
    kw: dict[str, Any] = {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    done: set[int] = set()

    def shard(m: nn.Module) -> None:
        if id(m) not in done and any(p.requires_grad for p in m.parameters()):
            fully_shard(m, **kw)
            done.add(id(m))

    for m in list(module.modules())[::-1]:  # innermost first
        if type(m).__name__ in FSDP_BLOCKS:
            shard(m)
    for m in list(module.modules())[::-1]:
        if isinstance(m, Denoiser):
            shard(m)
            if id(m) in done:
                for name in DENOISER_ENTRY_POINTS:
                    register_fsdp_forward_method(m, name)
    for m in _units(module):
        shard(m)
    fully_shard(module, **kw)
    # FSDP2 makes the first unit to run forward the root; the player must be it even when a method first calls a part
    # (DMD2's generator loss runs the fake score before the guidance player's own forward)
    module._get_fsdp_state()._lazy_init()
    after = dict(module.named_parameters())
    opt = _raw_optimizer(optimizer)
    assert not opt.state, "shard a player before its optimizer has state"
    for group in opt.param_groups:
        group["params"] = [after[names[id(p)]] for p in group["params"]]
    return module


def gather_player(module: nn.Module, skeleton: nn.Module, device: Any) -> nn.Module:
    """A plain (unsharded) module with ``module``'s full weights on every process: ``skeleton`` (a meta-device copy
    of the player taken before sharding) materialised on ``device``, its parameters gathered on rank 0 (in host
    memory) and broadcast one tensor at a time, its buffers copied (FSDP does not shard buffers). A collective: every
    process calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = skeleton.to_empty(device=device)
    rank0 = dist.get_rank() == 0
    with torch.no_grad():
        for name, p in plain.named_parameters():
            t = full[name].to(device) if rank0 else torch.empty(p.shape, dtype=p.dtype, device=device)
            dist.broadcast(t, src=0)
            p.copy_(t)
        buffers = dict(module.named_buffers())
        for name, b in plain.named_buffers():
            b.copy_(buffers[name])
    return plain.train(module.training)


def player_state(module: nn.Module, optimizer: Any, sharded: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(module_state, optimizer_state, format)`` of one player, on the CPU.

    Sharded: a collective -- every process must call it; the full state lands on rank 0 (the others get empty
    dicts, and only rank 0 writes checkpoints).
    """
    if not sharded:
        return _plain(module).state_dict(), _raw_optimizer(optimizer).state_dict(), INDEX
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(module, _raw_optimizer(optimizer),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model_sd, optim_sd, FQN


def load_player_state(module: nn.Module, optimizer: Any, module_state: dict[str, Any],
                      optimizer_state: dict[str, Any], fmt: str, sharded: bool) -> None:
    """Load a player's state written by :func:`player_state` (every process passes the full state it read).

    A name-keyed ("fqn") state loads into sharded and unsharded players alike; an index-keyed one (written without
    FSDP) loads into unsharded players only.
    """
    if fmt == INDEX and not sharded:
        _plain(module).load_state_dict(module_state)
        _raw_optimizer(optimizer).load_state_dict(optimizer_state)
        return
    if fmt == INDEX:
        raise ValueError("the checkpoint was written without FSDP (index-keyed optimizer state); resume it without "
                         "FSDP, or start a new run under FSDP")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        set_state_dict(module, _raw_optimizer(optimizer), model_state_dict=module_state,
                       optim_state_dict=optimizer_state, options=StateDictOptions(full_state_dict=True))
