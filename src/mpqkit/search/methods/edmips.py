"""EdMIPS (CVPR 2020): the differentiable supernet search with plain SGD; nothing added."""

from __future__ import annotations

from dataclasses import dataclass

from mpqkit.search.context import SupernetMethod
from mpqkit.search.registry import register_method


@dataclass
class EdMIPSConfig:
    """EdMIPS has no options of its own (the schedule is ``SearchConfig.optim``)."""


@register_method("edmips", config=EdMIPSConfig,
                 description="EdMIPS (CVPR 2020): differentiable search, plain SGD")
class EdMIPS(SupernetMethod):
    """EdMIPS: differentiable search with plain SGD."""

    name = "edmips"
