"""Distributed data parallel set up from the environment (``torchrun``), or a single process.

A single process needs no launcher: when ``WORLD_SIZE`` is unset or 1 nothing is initialised.
Under ``torchrun`` the process group uses NCCL on GPUs and gloo on CPUs (chosen from the device,
nothing to configure).

Training and fine-tuning wrap the model in ``DistributedDataParallel``. A supernet search is not
one forward and one backward per step (a penalty backward on the logits after the loss, bi-level
steps that freeze the weights or the logits, a double backward in GMPQ, ASGA's logits gradients
held outside the wrapper), so it averages gradients explicitly after every backward with
:func:`average_gradients`, starts from rank 0's state (:func:`broadcast_module`) and normalizes
with the statistics of the global batch (:func:`synced_batchnorm`): N processes with batch B
each compute what one process computes on batch N * B, up to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mpqkit.quant.fold import FlooredBatchNorm2d


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (the only place read)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any."""
    info = world_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the local GPU under torchrun / cuda:0 / cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", world_info().local_rank)
        return torch.device("cpu")
    return torch.device(spec)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: Iterable[Tensor]) -> None:
    """Replace the ``.grad`` of ``params`` by its mean over ranks (nothing in one process).

    A parameter with a gradient on some rank only gets zeros on the others; one without a
    gradient on every rank keeps ``None``. One flat all-reduce per device and dtype.
    """
    if not _active():
        return
    ps = [p for p in params if p.requires_grad]
    if not ps:
        return
    has = torch.tensor([float(p.grad is not None) for p in ps], device=ps[0].device)
    dist.all_reduce(has)
    used = [p for p, h in zip(ps, has.tolist(), strict=True) if h > 0]
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = float(dist.get_world_size())
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what ``DistributedDataParallel`` does)."""
    if not _active():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce`` (sum) whose backward sums the gradients over ranks (differentiable)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumOverRanks.apply(grad)  # type: ignore[no-any-return]


def _global_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """BatchNorm with the mean and (biased) variance of the batch of all ranks together.

    Running statistics take the global mean and unbiased variance, as one process on the whole
    batch would. Evaluation (running statistics) is the plain layer's.
    """
    base = type(self).__bases__[0]
    if not self.training and not (self.running_mean is None and self.running_var is None):
        return base.forward(self, x)  # type: ignore[no-any-return]
    base._check_input_dim(self, x)  # type: ignore[attr-defined]
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    n_local = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
    s = _SumOverRanks.apply(torch.cat([x.sum(dims), n_local]))
    n = s[-1].detach()
    mean = s[:-1] / n
    xc = x - mean.view(shape)
    var = _SumOverRanks.apply(xc.square().sum(dims)) / n
    scale = torch.rsqrt(var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    y = xc * scale.view(shape)
    if self.bias is not None:
        y = y + self.bias.view(shape)
    if self.training and self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            f = self.momentum if self.momentum is not None else 0.0
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    f = 1.0 / float(self.num_batches_tracked)
            assert self.running_var is not None
            self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            unbiased = var.detach() * (n / (n - 1).clamp(min=1))
            self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
    return y


_GLOBAL_BN: dict[type, type] = {}


def _global_class(cls: type) -> type:
    if cls not in _GLOBAL_BN:
        _GLOBAL_BN[cls] = type(f"Global{cls.__name__}", (cls,), {"forward": _global_bn_forward})
    return _GLOBAL_BN[cls]


@contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s BatchNorm layers use the statistics of the global batch.

    Each ``BatchNorm1d/2d/3d`` gets a subclass whose training forward all-reduces the per-channel
    sums (forward and backward): parameters, buffers and names are unchanged, so checkpoints are
    too. Works with gloo and NCCL; nothing changes in one process.
    """
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, FlooredBatchNorm2d)
    swapped = [(m, type(m)) for m in model.modules() if type(m) in kinds] if _active() else []
    try:
        for m, cls in swapped:
            m.__class__ = _global_class(cls)
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
