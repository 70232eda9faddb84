"""The dataset type returned by :func:`mpqkit.data.build_data`: a view on decoded or file images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mpqkit.data.decode import decode_file, fit_square
from mpqkit.data.transforms import Pipeline, sample_keys


class ArrayStore:
    """A whole split decoded into memory: uint8 images (N, H, W, 3) and int64 labels."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self._array = images.numpy()
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: np.ndarray) -> np.ndarray:
        """The images at store indices ``idx`` as one (B, H, W, 3) uint8 array."""
        return self._array[idx]


class FileStore:
    """A split read from image files on every access (for data too large to hold in memory)."""

    in_memory = False

    def __init__(self, paths: list[str], labels: np.ndarray, size: int | None) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size = size  # fixed storage size (small images), None to keep originals

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Images at ``idx``: a (B, S, S, 3) uint8 array for a fixed size, else a list of
        (H, W, 3) arrays."""
        imgs = [decode_file(self.paths[i]) for i in idx.tolist()]
        if self.size is None:
            return [img.numpy() for img in imgs]
        return np.stack([fit_square(img, self.size).numpy() for img in imgs])


class ImageDataset(Dataset):
    """Selected samples of one split; items are ``(float tensor (3, S, S) normalized, int label)``.

    With ``augment`` on, the random crop/flip of a sample is a pure function of
    ``(seed, epoch, index of the sample in its full split)``; set the epoch with
    :meth:`set_epoch` (``make_loader`` passes seed and epoch itself, without mutating the
    dataset). Batched access (``__getitems__``, :meth:`get_batch`) augments a whole batch at once
    and gives the same tensors as item-by-item access.
    """

    def __init__(
        self,
        store: ArrayStore | FileStore,
        indices: np.ndarray,
        pipeline: Pipeline,
        *,
        classes: list[str],
        augment: bool,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.pipeline = pipeline
        self.classes = list(classes)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.split = split

    @property
    def targets(self) -> list[int]:
        """Labels of the samples, in dataset order."""
        return self.store.labels[self.indices].tolist()

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset (not only those present in this selection)."""
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        """Whether the images are held decoded in memory."""
        return self.store.in_memory

    def view(self, indices: np.ndarray, *, augment: bool, split: str) -> ImageDataset:
        """Another selection of the same store (shares the decoded images)."""
        return ImageDataset(
            self.store, indices, self.pipeline, classes=self.classes, augment=augment,
            seed=self.seed, split=split,
        )

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Epoch (and optionally seed) of the augmentation for plain ``__getitem__`` access."""
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def _positions(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = len(self.indices)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} samples")
        return np.where(pos < 0, pos + n, pos)

    def get_batch(
        self,
        positions: Sequence[int] | np.ndarray,
        *,
        seed: int | None = None,
        epoch: int | None = None,
        augment: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) float32 and labels (B,) int64 of the samples at ``positions``.

        ``seed``/``epoch`` default to the dataset's (see :meth:`set_epoch`); ``augment=False``
        turns augmentation off for a training split (evaluation on train data).
        """
        idx = self.indices[self._positions(positions)]
        do_aug = self.augment if augment is None else (augment and self.augment)
        keys = None
        if do_aug:
            keys = sample_keys(
                self.seed if seed is None else seed, self.epoch if epoch is None else epoch, idx
            )
        images = self.pipeline(self.store.load(idx), keys)
        return images, torch.from_numpy(self.store.labels[idx])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.get_batch([int(i)])
        return images[0], int(labels[0])

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]]:
        images, labels = self.get_batch(positions)
        return list(zip(images.unbind(0), labels.tolist()))

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "from files"
        return (
            f"ImageDataset({self.split}, {len(self)} samples, {self.num_classes} classes, "
            f"{self.pipeline.size}px, augment={self.augment}, {where})"
        )
