"""Sharpness-aware optimizers (SAM, GSAM, ASGA) and sharpness measurement.

Usable outside mpqkit: the wrappers take any ``torch.optim.Optimizer`` and work under DDP and AMP.
"""

from mpqkit.optim.bn import frozen_bn_stats
from mpqkit.optim.factory import (
    OptimConfig,
    OptimizerSet,
    StepSchedule,
    base_optimizer,
    create_optimizer,
    param_groups,
    wrap_sharpness,
)
from mpqkit.optim.gap import surrogate_gap
from mpqkit.optim.sharpness import ASGA, GSAM, SAM, UPDATES, GradScalerLike, SharpnessAware

__all__ = [
    "ASGA",
    "GSAM",
    "SAM",
    "UPDATES",
    "GradScalerLike",
    "OptimConfig",
    "OptimizerSet",
    "SharpnessAware",
    "StepSchedule",
    "base_optimizer",
    "create_optimizer",
    "frozen_bn_stats",
    "param_groups",
    "surrogate_gap",
    "wrap_sharpness",
]
