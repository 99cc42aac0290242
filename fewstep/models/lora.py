"""LoRA players: low-rank adapters (PEFT) on a copy of the teacher, whose frozen base weights are the teacher's own.

Every method builds its trained networks as copies of the teacher (DMD2's generator and fake score, ADD's student).
With ``lora_rank`` set, :func:`apply_lora` injects PEFT LoRA layers into such a copy and freezes everything else, and
:func:`share_frozen_weights` points the copy's frozen base weights at the teacher's parameters, so an SDXL-class
teacher is held once in memory however many LoRA players sit on it (README, "Memory budget").

Targets (default): every ``nn.Linear`` and ``nn.Conv2d`` of the network -- attention projections, feed-forwards,
residual-block convolutions, time-embedding layers. ``B`` starts at zero, so a LoRA player starts exactly at the
teacher. ``alpha`` defaults to ``rank`` (scale 1); DMD2's ``lora_alpha`` sets it (its official SDXL LoRA run: rank 64,
alpha 8, scale 1/8), and :func:`fewstep.export.lora_of_student` folds the scale into ``B`` for diffusers.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import UserError

#: the PEFT adapter name of fewstep's LoRA players
ADAPTER = "default"


def lora_targets(net: nn.Module, types: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[str]:
    """Full names of the layers LoRA adapts by default: every Linear and Conv2d of ``net``."""
    return [name for name, m in net.named_modules() if isinstance(m, types) and name]


def apply_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Inject LoRA adapters into ``module`` in place and freeze everything but them.

    Args:
        module: a network or a denoiser (its ``net`` is adapted).
        rank: LoRA rank ``r`` (>= 1).
        alpha: LoRA alpha (scale ``alpha / r``); None = ``rank``.
        targets: names of the layers to adapt (default: :func:`lora_targets`).
        dropout: dropout on the LoRA branch.

    Returns:
        ``module`` itself, with only the adapters' parameters requiring gradients.
    """
    if rank < 1:
        raise UserError(f"lora_rank must be at least 1, got {rank}; or null for full fine-tuning")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise UserError(f"LoRA players need peft ({e}); pip install peft") from None
    net = getattr(module, "net", module)
    names = list(targets) if targets is not None else lora_targets(net)
    if not names:
        raise UserError(f"{type(net).__name__} has no Linear or Conv2d layers for LoRA; set lora_rank: null")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=names,
                     lora_dropout=dropout, init_lora_weights=True)
    inject_adapter_in_model(cfg, net, adapter_name=ADAPTER)
    for name, p in net.named_parameters():
        p.requires_grad_(".lora_" in name)
    return module


def add_adapters(module: nn.Module, names: Iterable[str], rank: int, alpha: float | None = None,
                 targets: Iterable[str] | None = None) -> nn.Module:
    """Inject one LoRA adapter per name into ``module`` (a network or a denoiser) in place, keeping every other
    parameter's ``requires_grad`` as it was (a full network stays trained: the adapters are deltas on a trained trunk;
    a LoRA player keeps its frozen base). ``B`` starts at zero, so each adapter starts as the network itself. Which
    adapters a call uses is chosen with :func:`active_adapters`; outside it, the network is what it was before.

    Args:
        module: a network or a denoiser (its ``net`` is adapted).
        names: adapter names (DMD2's per-step fake scores: ``step1 .. stepk``).
        rank: their rank; alpha: their alpha (None = ``rank``).
        targets: the layers to adapt (default: every Linear and Conv2d, found before any adapter was injected).
    """
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = getattr(module, "net", module)
    before = active_adapter_names(net)
    grad = {name: p.requires_grad for name, p in net.named_parameters()}
    if targets is None:  # the network's own layers (an adapted one by its own name), not the adapters' layers
        targets = [n.removesuffix(".base_layer") for n in lora_targets(net) if ".lora_" not in n]
    names, targets = list(names), sorted(set(targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters in the model": that is the point
        for name in names:
            cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                             init_lora_weights=True)
            inject_adapter_in_model(cfg, net, adapter_name=name)
    for name, p in net.named_parameters():
        p.requires_grad_(grad.get(name, True))  # new adapter weights train; everything else as it was
    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = list(before)
    return module


def active_adapter_names(net: nn.Module) -> list[str]:
    """The adapters ``net``'s LoRA layers apply now ([] without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in net.modules() if isinstance(m, BaseTunerLayer)), None)
    return [] if layer is None else list(layer.active_adapters)


def select_adapters(module: nn.Module, names: Iterable[str]) -> None:
    """Make ``module``'s LoRA layers apply exactly the adapters ``names`` from now on (``requires_grad`` untouched)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in getattr(module, "net", module).modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = list(names)


@contextlib.contextmanager
def active_adapters(module: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, ``module``'s LoRA layers apply exactly the adapters ``names`` (the others are skipped);
    ``requires_grad`` is left alone (PEFT's ``set_adapter`` would freeze the others, which the optimizers, DDP and
    FSDP must not see change). Restores the previous selection on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = getattr(module, "net", module)
    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = list(names)
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._active_adapter = b


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A Linear/Conv2d weight change ``delta`` as LoRA factors by truncated SVD: ``(A, B, left)`` with ``B @ A`` the
    best rank-``rank`` approximation (scale 1; PEFT's shapes: a conv's ``A`` is ``(r, in, kh, kw)`` and ``B``
    ``(out, r, 1, 1)``) and ``left`` the squared Frobenius norm of what it leaves out. Computed in ``delta``'s dtype."""
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    left = float((flat - b @ a).pow(2).sum())
    if delta.dim() == 4:
        a, b = a.reshape(r, *delta.shape[1:]), b.reshape(delta.shape[0], r, 1, 1)
    return a, b, left


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in module.named_parameters())


def base_name(name: str) -> str:
    """The teacher's name of a LoRA-adapted network's base parameter (``x.base_layer.weight`` -> ``x.weight``)."""
    return name.replace(".base_layer.", ".")


def share_frozen_weights(module: nn.Module, source: nn.Module) -> int:
    """Make ``module``'s frozen parameters *be* ``source``'s parameters of the same (base) name and shape.

    For a LoRA copy of the teacher this stores the base weights once. Nothing may write to shared weights (they are
    frozen in both; a method that loads other weights into a player -- DisBack's fake score starting from the end of
    its degradation path -- uses :func:`load_network_state`, which unshares first). Returns how many were shared.
    """
    src = dict(source.named_parameters())
    shared = 0
    for name, p in list(module.named_parameters()):
        if p.requires_grad:
            continue
        q = src.get(base_name(name))
        if q is None or q is p or q.shape != p.shape or q.requires_grad:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, q)
        shared += 1
    return shared


def load_network_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a plain network state (the teacher's key names) into ``net``, strictly.

    For a LoRA-adapted ``net`` the state goes into the base weights (frozen ones as new tensors: weights shared with
    the teacher are unshared, never overwritten; trained ones in place) and the adapters are reset to zero
    (``B = 0``), so ``net`` computes exactly the loaded network.
    """
    if not has_lora(net):
        net.load_state_dict(state, strict=True)
        return
    params = dict(net.named_parameters())
    expected = {base_name(k) for k in net.state_dict() if ".lora_" not in k}  # persistent buffers included
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise RuntimeError(f"state does not match the network: missing {sorted(missing)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_" in name:
                if ".lora_B." in name:
                    p.zero_()
                continue
            value = state[base_name(name)].to(device=p.device, dtype=p.dtype)
            if p.requires_grad:  # a trained weight (a full network with adapters on it): in place, the optimizer's
                p.copy_(value)
                continue
            parent, _, leaf = name.rpartition(".")
            owner = net.get_submodule(parent) if parent else net
            setattr(owner, leaf, nn.Parameter(value.clone(), requires_grad=False))
        for name, b in net.named_buffers():
            if base_name(name) in state:
                b.copy_(state[base_name(name)])


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should hold (LoRA players: the adapters and any unfrozen head)."""
    return [p for p in module.parameters() if p.requires_grad]


def lora_state(module: nn.Module) -> dict[str, Any]:
    """The adapters' weights alone, in PEFT's key format (``...lora_A.weight``), for saving a LoRA student."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(getattr(module, "net", module), adapter_name=ADAPTER)
