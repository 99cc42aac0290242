"""fewstep: distill a pretrained diffusion model into a generator that samples in 1 to 8 steps."""
from .api import evaluate, generate, load_model, load_teacher, sample
from .distillation import distill
from .export import export
from .diffusion.denoiser import CFGDenoiser, Denoiser
from .errors import UserError
from .student import Student

__version__ = "0.1.0"
__all__ = ["load_teacher", "load_model", "distill", "export", "sample", "generate", "evaluate", "Student", "Denoiser",
           "CFGDenoiser", "UserError"]
