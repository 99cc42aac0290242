"""A distilled few-step student: a generator denoiser plus the fixed timesteps it samples at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diffusion.denoiser import Denoiser
from .diffusion.samplers import STUDENT_SAMPLERS
from .errors import UserError
from .models import load_denoiser, save_denoiser


class Student(nn.Module):
    """``student.sample(n, labels)``: the k-step student sampler over ``timesteps`` (METHODS.md common notation),
    re-noising between steps (:class:`ODEStudent` takes ODE steps instead).

    Args:
        generator: the generator, a denoiser ``G(x_t, t, cond) -> x0_hat``.
        timesteps: its input times ``t_1 > ... > t_k``.
    """

    #: the name of its sampler in :data:`fewstep.diffusion.samplers.STUDENT_SAMPLERS` (``meta.sampler`` when saved)
    sampler = "renoise"

    def __init__(self, generator: Denoiser, timesteps: Tensor | list[float], info: dict[str, Any] | None = None):
        super().__init__()
        self.generator = generator
        self.register_buffer("timesteps", torch.as_tensor(timesteps, dtype=torch.float32), persistent=False)
        self.info = info or {}

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def schedule(self) -> Any:
        return self.generator.schedule

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.generator.sample_shape

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: Tensor | list[int] | None = None,
        seed: int = 0,
        z: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` samples; ``labels`` are class indices for a class-conditional student (default: balanced).

        ``z`` (the initial noise) and ``generator`` (a CPU generator for ``z`` and the re-noising draws) default to
        ones made from ``seed``."""
        device = next(self.generator.parameters()).device
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        if z is None:
            z = torch.randn((n, *self.sample_shape), generator=gen)
        if labels is None and self.num_classes > 0:
            labels = torch.arange(n) % self.num_classes
        elif labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
        was_training = self.generator.training
        self.generator.eval()  # the student as saved: no dropout, whatever mode training left it in
        try:
            x = self._sample(z.to(device), None if labels is None else labels.to(device), gen)
        finally:
            self.generator.train(was_training)
        return x.cpu()

    def _sample(self, z: Tensor, cond: Tensor | None, gen: torch.Generator) -> Tensor:
        """The k-step sampler from pure noise ``z`` (re-noising draws, if any, from ``gen``)."""
        return STUDENT_SAMPLERS[self.sampler](self.generator, z, self.timesteps.to(z.device), cond, generator=gen)


class ODEStudent(Student):
    """A student that takes deterministic ODE (DDIM) steps between its timesteps instead of re-noising
    (SDXL-Lightning's: :class:`fewstep.methods.lightning.LightningStudent` is this class)."""

    sampler = "ode"


#: student kinds by their saved ``meta.sampler`` (a registry, so that no method module is imported to load one)
STUDENT_KINDS: dict[str, type[Student]] = {cls.sampler: cls for cls in (Student, ODEStudent)}


def save_student(student: Student, prefix: str | Path, **meta: Any) -> Path:
    """``prefix.safetensors`` + ``prefix.json``; the JSON records the timesteps and whatever ``meta`` holds."""
    return save_denoiser(student.generator, prefix, kind="student", timesteps=student.timesteps.tolist(), **meta)


def load_student(prefix: str | Path, module: nn.Module | None = None) -> Student:
    """Load a saved student (``prefix``: the path without suffix, or a ``fewstep distill`` run directory); one whose
    JSON says ``meta.sampler == "ode"`` (SDXL-Lightning's students) takes deterministic ODE steps between its
    timesteps instead of re-noising.

    ``module``: a student of a network wrapped without ``init_args`` (:func:`fewstep.wrap`): a freshly built module
    of the same architecture, which the saved weights are loaded into.
    """
    path = Path(prefix)
    if path.is_dir() and (path / "student.json").is_file():
        prefix = path / "student"
    elif path.suffix in (".json", ".safetensors"):
        prefix = path.with_suffix("")
    den, desc = load_denoiser(prefix, module)
    meta = desc.get("meta") or {}
    if meta.get("kind") != "student" or not meta.get("timesteps"):
        what = "a teacher" if meta.get("kind") in (None, "teacher") else f"a {meta.get('kind')!r}"
        raise UserError(f"{Path(prefix).with_suffix('.json')} describes {what}, not a distilled student (no "
                        "meta.kind 'student' with timesteps); give the run directory of `fewstep distill`, or load "
                        "a teacher with --teacher / fewstep.load_teacher")
    kind = meta.get("sampler") or Student.sampler
    if kind not in STUDENT_KINDS:
        raise UserError(f"{Path(prefix).with_suffix('.json')} names student sampler {kind!r}, which this fewstep "
                        f"does not have ({', '.join(STUDENT_KINDS)}); load it with the fewstep version that saved it")
    return STUDENT_KINDS[kind](den, meta["timesteps"], info=desc)
