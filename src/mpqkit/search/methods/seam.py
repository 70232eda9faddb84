"""SEAM (ACM MM 2023): a large-margin regularizer on the penultimate features.

Our reading of the paper: with L2-normalized features ``z_i`` (the input of the last linear
layer) and normalized batch class centres ``c_k``, ``intra = mean_i (1 - <z_i, c_{y_i}>)``
(compactness) and ``inter = mean_{k != l} relu(<c_k, c_l> - seam_margin)`` (separation); the
loss adds ``seam_weight * (intra + inter)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mpqkit.search.context import SearchContext, SupernetMethod
from mpqkit.search.methods._taps import FeatureTap, head_name
from mpqkit.search.registry import register_method
from mpqkit.search.supernet import Supernet


@dataclass
class SEAMConfig:
    seam_weight: float = field(default=1.0, metadata={"help": "weight of the margin loss"})
    seam_margin: float = field(default=0.0, metadata={
        "help": "class centres more similar than this are pushed apart"})

    def __post_init__(self) -> None:
        if self.seam_weight < 0:
            from mpqkit.errors import ConfigError

            raise ConfigError(f"seam_weight={self.seam_weight} must be >= 0")


def margin_loss(features: Tensor, target: Tensor, margin: float = 0.0) -> Tensor:
    """Intra-class compactness plus inter-class separation of L2-normalized features."""
    z = F.normalize(features.flatten(1), dim=1)
    classes, inv = torch.unique(target, return_inverse=True)
    centres = torch.zeros(len(classes), z.shape[1], device=z.device, dtype=z.dtype)
    centres = centres.index_add(0, inv, z)
    centres = F.normalize(centres, dim=1)
    intra = (1.0 - (z * centres[inv]).sum(1)).mean()
    if len(classes) < 2:
        return intra
    sim = centres @ centres.t()
    off = ~torch.eye(len(classes), dtype=torch.bool, device=z.device)
    inter = F.relu(sim[off] - margin).mean()
    return intra + inter


@register_method("seam", config=SEAMConfig,
                 description="SEAM (ACM MM 2023): large-margin feature regularizer")
class SEAM(SupernetMethod):
    """SEAM: large-margin regularization of the penultimate features."""

    name = "seam"

    def __init__(self) -> None:
        self.tap: FeatureTap | None = None

    def setup(self, ctx: SearchContext, supernet: Supernet) -> dict[str, Any]:
        head = head_name(supernet)
        self.tap = FeatureTap(supernet.net.get_submodule(head), output=False)
        return {"seam": {"weight": ctx.options.seam_weight, "margin": ctx.options.seam_margin,
                         "features": f"input of {head}"}}

    def loss(self, ctx: SearchContext, supernet: Supernet, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        assert self.tap is not None, "setup() first"
        logits = supernet(x)
        ce = F.cross_entropy(logits, y)
        assert self.tap.value is not None
        reg = margin_loss(self.tap.value, y, ctx.options.seam_margin)
        loss = ce + ctx.options.seam_weight * reg
        return loss, logits, {"task_loss": float(ce.detach()), "extra_loss": float(reg.detach())}
