"""fewstep: distill a pretrained diffusion model into a generator that samples in 1 to 8 steps.

The API is imported on first use (PEP 562), so ``import fewstep.cli`` and ``fewstep --help`` do not import torch.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {"load_teacher": ".api", "load_model": ".api", "sample": ".api", "generate": ".api", "evaluate": ".api",
        "distill": ".distillation", "export": ".export", "Student": ".student", "load_student": ".student",
        "save_student": ".student", "wrap": ".models.module", "Denoiser": ".diffusion.denoiser",
        "CFGDenoiser": ".diffusion.denoiser", "UserError": ".errors"}
__all__ = ["load_teacher", "load_model", "wrap", "distill", "export", "sample", "generate", "evaluate", "Student",
           "load_student", "save_student", "Denoiser", "CFGDenoiser", "UserError"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """Importing the submodule ``fewstep.export`` binds it on the package; ``fewstep.export`` stays the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "export" and isinstance(value, types.ModuleType):
            value = value.export
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
