"""Names and limits shared by the command line, the configs and the modules behind them.

This module imports nothing, so that building the parser (``fewstep --help``) stays fast; the modules that implement
these names import them from here rather than keeping copies.
"""

SAMPLERS = ("ddim", "euler", "heun")  # teacher samplers (fewstep.diffusion.samplers)
EXPORT_FORMATS = ("diffusers", "lora")  # fewstep.export
TEACHERS = ("digits", "ring8", "grid25", "moons", "checkerboard", "swissroll")  # shipped teachers (fewstep.zoo)
CLASSIFIER = "digits_classifier"  # the shipped feature network (fewstep.zoo)

MAX_STUDENT_STEPS = 8  # few-step students: 1..8 steps
MAX_CONTINUOUS_STEPS = 10_000  # teacher sampling on a schedule without discrete timesteps (EDM)
MAX_ITERATIONS = 10**9  # training iterations; more is a typo (1e9 iterations of the smallest model take years)
MAX_BATCH_SIZE = 2**20  # samples per training batch
MAX_LR = 1.0  # learning rates: AdamW diverges well below 1
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds
