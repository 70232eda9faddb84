"""Shared fixtures of the export tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mpqkit.models import build_model


def _resnet20_with_bn_stats(seed: int = 0) -> nn.Module:
    """resnet20 in eval mode whose BatchNorm statistics come from two batches of random data."""
    torch.manual_seed(seed)
    model = build_model("resnet20")
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="session")
def resnet20_bn() -> Callable[[int], nn.Module]:
    """A factory: ``resnet20_bn(seed)`` is a fresh resnet20 with BatchNorm statistics."""
    return _resnet20_with_bn_stats
