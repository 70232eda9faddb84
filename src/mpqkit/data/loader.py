"""Deterministic, resumable, DDP-aware data loaders.

Order of a training epoch: a permutation of the whole dataset that is a pure function of
``(seed, epoch)``. Under DDP (or explicit ``rank``/``world_size``) the permutation is cut to
``world_size * (n // world_size)`` samples (the last ``n % world_size`` positions of the
permutation are dropped for that epoch, like ``DistributedSampler(drop_last=True)``) and rank
``r`` takes positions ``r, r + world_size, ...``: disjoint, equal-size shares, so every rank runs
the same number of batches. Batches are cut from the rank's share; ``start_batch=k`` starts at
batch ``k`` without loading batches ``0..k-1``.

Evaluation (``train=False``): dataset order, no augmentation, no sample dropped. Under DDP rank
``r`` takes the contiguous block ``[r*n//W, (r+1)*n//W)``: every sample is evaluated exactly
once across ranks, but shares may differ by one sample (and so in batch count): sum correct
predictions and losses per rank and ``all_reduce`` the sums after the loop, with no collective
inside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mpqkit.data.dataset import ImageDataset
from mpqkit.data.transforms import mix_seed
from mpqkit.errors import ConfigError

_ORDER_SALT = 0x5EED0F0D


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the explicit values, else torch.distributed's, else (0, 1)."""
    if rank is None or world_size is None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if initialized else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if initialized else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"rank {rank} / world_size {world_size} is invalid: need world_size >= 1 and "
            f"0 <= rank < world_size"
        )
    return rank, world_size


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` samples for ``epoch``: a pure function of (seed, epoch)."""
    rng = np.random.default_rng(mix_seed(_ORDER_SALT, seed, epoch))
    return rng.permutation(n)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch for one rank, starting at batch ``start_batch``.

    ``drop_last=None`` means: in training, drop the last batch only when it would hold a single
    sample (BatchNorm cannot train on it); in evaluation, keep everything.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} is invalid: pass a batch size >= 1")
        if shuffle and n < world_size:
            raise ConfigError(
                f"{n} training samples cannot be shared by {world_size} ranks: use a larger "
                f"subset or fewer processes"
            )
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        share = self.share_size()
        if drop_last is None:
            drop_last = shuffle and share % batch_size == 1 and share > 1
        self.drop_last = drop_last
        full, rest = divmod(share, batch_size)
        self.total_batches = full + (1 if rest and not drop_last else 0)
        if not 0 <= start_batch <= self.total_batches:
            raise ConfigError(
                f"start_batch {start_batch} is outside this epoch's 0..{self.total_batches} "
                f"batches: resume from a batch index saved for the same dataset, batch size and "
                f"world size"
            )
        self.start_batch = start_batch

    def share_size(self) -> int:
        """Number of samples this rank sees in the epoch."""
        if self.shuffle:
            return self.n // self.world_size
        lo = self.rank * self.n // self.world_size
        hi = (self.rank + 1) * self.n // self.world_size
        return hi - lo

    def indices(self) -> np.ndarray:
        """This rank's samples for the epoch, in order (before batching and skipping)."""
        if self.shuffle:
            order = epoch_order(self.n, self.seed, self.epoch)
            total = (self.n // self.world_size) * self.world_size
            return order[self.rank:total:self.world_size]
        lo = self.rank * self.n // self.world_size
        hi = (self.rank + 1) * self.n // self.world_size
        return np.arange(lo, hi)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        bs = self.batch_size
        for b in range(self.start_batch, self.total_batches):
            yield idx[b * bs:(b + 1) * bs].tolist()

    def __len__(self) -> int:
        return self.total_batches - self.start_batch


class _EpochView(Dataset):
    """An :class:`ImageDataset` bound to one (seed, epoch, augment); batches come pre-collated."""

    def __init__(self, base: ImageDataset, seed: int, epoch: int, augment: bool) -> None:
        self.base = base
        self.seed = seed
        self.epoch = epoch
        self.augment = augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.get_batch(
            positions, seed=self.seed, epoch=self.epoch, augment=self.augment
        )


def _collated(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    workers: int = 0,
    drop_last: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader for one epoch of ``dataset`` (see the module docstring for order and DDP).

    ``train=True``: shuffled by (seed, epoch), augmented (if the dataset augments) from
    (seed, epoch, sample index), sharded across ranks. ``train=False``: dataset order, no
    augmentation, every sample once. ``start_batch=k`` resumes mid-epoch: the loader yields
    batches ``k..`` of the same epoch, identical to those of an uninterrupted run. ``rank`` and
    ``world_size`` default to torch.distributed's when it is initialized. The batch sampler
    (``loader.batch_sampler``) is an :class:`EpochBatchSampler`: ``total_batches`` is the
    epoch's batch count including skipped ones, ``len(loader)`` the count still to come.
    """
    rank, world_size = dist_info(rank, world_size)
    if workers < 0:
        raise ConfigError(f"workers {workers} is invalid: pass 0 (main process) or more")
    sampler = EpochBatchSampler(
        len(dataset), batch_size, shuffle=train, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, drop_last=drop_last, start_batch=start_batch,
    )
    if isinstance(dataset, ImageDataset):
        source: Dataset = _EpochView(dataset, seed, epoch, train)
        collate = _collated
    else:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        source, collate = dataset, default_collate
    return DataLoader(
        source, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=pin_memory,
    )
