"""Training: the loop on Accelerate, the EMA, and teacher training."""
from .ema import EMA
from .loop import check_run_dir, latest_checkpoint, list_checkpoints, load_checkpoint, read_metrics, train
from .teacher import DenoisingObjective, TeacherMethod, resolve_teacher_config, train_teacher

__all__ = [
    "EMA",
    "train",
    "check_run_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_metrics",
    "TeacherMethod",
    "DenoisingObjective",
    "resolve_teacher_config",
    "train_teacher",
]
