"""fewstep: distill a pretrained diffusion model into a generator that samples in 1 to 8 steps."""
from .api import evaluate, generate, load_teacher, sample
from .diffusion.denoiser import CFGDenoiser, Denoiser
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["load_teacher", "sample", "generate", "evaluate", "Denoiser", "CFGDenoiser", "UserError"]
