"""Sharpness-aware optimizers (SAM, GSAM, ASGA) and sharpness measurement.

Usable outside mpqkit: the wrappers take any ``torch.optim.Optimizer`` and work under DDP and AMP.
"""

from mpqkit.optim.bn import frozen_bn_stats
from mpqkit.optim.gap import surrogate_gap
from mpqkit.optim.sharpness import ASGA, GSAM, SAM, UPDATES, GradScalerLike, SharpnessAware

__all__ = [
    "ASGA",
    "GSAM",
    "SAM",
    "UPDATES",
    "GradScalerLike",
    "SharpnessAware",
    "frozen_bn_stats",
    "surrogate_gap",
]
