"""ASGA (ICML 2025): the supernet trained with adaptive sharpness-aware gradient aligning.

The optimizer is :class:`mpqkit.optim.ASGA` around ``SearchConfig.optim``'s base optimizer
(``rho0``, ``rho_max``, ``rho_min``, ``gamma``, ``adaptive``, ``h_ema`` are ``optim`` fields). All
parameters except the logits are perturbed (``perturb_logits`` switches that); the logits
receive the aligned gradient ``(g + g_adv) / 2``; the complexity gradient is added to the logits
once, after the two passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpqkit.search.context import SearchContext, SupernetMethod
from mpqkit.search.registry import register_method


@dataclass
class ASGAConfig:
    perturb_logits: bool = field(default=False, metadata={
        "help": "perturb the architecture logits too (default: weights, BN and steps only)"})


@register_method("asga", config=ASGAConfig, description="ASGA (ICML 2025): supernet with "
                 "adaptive sharpness-aware gradient aligning (the default)")
class ASGAMethod(SupernetMethod):
    """ASGA: the supernet trained with adaptive sharpness-aware gradient aligning."""

    name = "asga"
    sharpness = "asga"

    def param_group_options(self, ctx: SearchContext) -> dict[str, Any]:
        return {"perturb": bool(ctx.options.perturb_logits)}
