"""Freezing the running statistics of normalization layers for a forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

__all__ = ["frozen_bn_stats"]


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Keep every running statistic of ``model`` unchanged inside the ``with`` block.

    BatchNorm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants) stop tracking: in
    training mode they still normalize with the statistics of the batch, but ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are not touched. Other normalization layers with
    running statistics (``InstanceNorm`` with ``track_running_stats=True``) get their buffers
    saved and copied back on exit. Everything is restored even if the block raises.
    """
    toggled: list[_BatchNorm] = []
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for module in model.modules():
            if not isinstance(module, _NormBase) or not module.track_running_stats:
                continue
            if isinstance(module, _BatchNorm):
                module.track_running_stats = False
                toggled.append(module)
            else:
                for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                    if isinstance(buf, torch.Tensor) and not isinstance(
                        buf, nn.parameter.UninitializedBuffer
                    ):
                        saved.append((buf, buf.detach().clone()))
        yield model
    finally:
        for module in toggled:
            module.track_running_stats = True
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
