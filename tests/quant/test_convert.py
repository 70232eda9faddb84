"""quantize_model on layer subclasses: known equivalent ones quantize, others are one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqkit.errors import PolicyError
from mpqkit.policy import Policy
from mpqkit.quant import calibrate, quantize_model
from mpqkit.quant.layers import QLinear


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass with a forward of its own (like timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_a_subclass_with_its_own_forward_is_one_line():
    model = nn.Sequential(PaddedConv(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    policy = Policy.uniform(model, 4, 4, 6)
    with pytest.raises(PolicyError, match=r"layer '0' is a .*PaddedConv, a subclass of Conv2d "
                                          r"with a forward of its own.*register_qlayer"):
        quantize_model(model, policy)


def test_timm_linear_quantizes_as_linear():
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), layers.Linear(4 * 4 * 4, 2))
    q = quantize_model(model, Policy.uniform(model, 4, 4, 6))
    assert isinstance(q[2], QLinear)
    calibrate(q, torch.randn(2, 3, 6, 6))
    assert q(torch.randn(2, 3, 6, 6)).shape == (2, 2)
