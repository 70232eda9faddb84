"""Distributed data parallel set up from the environment (``torchrun``), or a single process.

A single process needs no launcher: when ``WORLD_SIZE`` is unset or 1 nothing is initialised.
Under ``torchrun`` the process group uses NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
