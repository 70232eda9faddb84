"""Deterministic augmentation and normalization on uint8 image batches.

Every random choice for a sample is derived from ``sample_keys(seed, epoch, index)``: a 64-bit
hash of the run seed, the epoch and the sample's index in its split. It never touches a global
RNG, so results do not depend on worker count, batch position or what ran before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torchvision.transforms.v2 import functional as TF

from mpqkit.data.config import SMALL_IMAGE_MAX
from mpqkit.data.decode import fit_square

_MASK = (1 << 64) - 1
_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _G
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """64-bit keys (uint64 array), a pure function of (seed, epoch, index) per sample."""
    base = _splitmix(np.array([seed & _MASK], dtype=np.uint64))
    base = _splitmix(base ^ np.uint64(epoch & _MASK))
    return _splitmix(base ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


def mix_seed(*values: int) -> int:
    """A 63-bit integer mixed from ``values`` (for seeding generators)."""
    key = np.zeros(1, dtype=np.uint64)
    for v in values:
        key = _splitmix(key ^ np.uint64(v & _MASK))
    return int(key[0]) & ((1 << 63) - 1)


def crop_padding(size: int) -> int:
    """Padding of the standard random crop: 4 px at 32 px, scaled with the input size."""
    return max(1, round(size / 8))


def _rrc_params(
    key: int, h: int, w: int, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width) drawn from a generator seeded by key."""
    rng = np.random.default_rng(key)
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class Pipeline:
    """How one split turns stored uint8 images into normalized float tensors.

    ``profile`` is ``"small"`` for fixed-size small images (CIFAR, Tiny-ImageNet-32, small image
    folders) and ``"imagenet"`` for ImageNet-like folders. Training: inputs under 64 px get a
    random crop with zero padding (4 px at 32 px) and a horizontal flip; inputs of 64 px and more
    get RandomResizedCrop(scale 0.08-1) and a flip. Evaluation: small images are resized to the
    input size (a no-op at the native size); ImageNet-like ones are resized to size/0.875 on the
    shorter side and center-cropped (256 -> 224).
    """

    size: int
    profile: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        std = np.asarray(self.std, dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        object.__setattr__(self, "_scale", (1.0 / (255.0 * std)).reshape(1, 3, 1, 1))
        object.__setattr__(self, "_shift", (mean / std).reshape(1, 3, 1, 1))

    @property
    def eval_resize(self) -> int:
        """Shorter-side resize before the center crop, for the ImageNet-like profile."""
        return int(round(self.size / 0.875))

    def normalize(self, batch: np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) uint8 (any strides) -> contiguous float32, in [0, 1] and standardized."""
        out = np.empty(batch.shape, dtype=np.float32)
        out[...] = batch
        out *= self._scale  # type: ignore[attr-defined]
        out -= self._shift  # type: ignore[attr-defined]
        return torch.from_numpy(out)

    def _as_batch(self, images: np.ndarray | list[np.ndarray], size: int) -> np.ndarray:
        """(B, size, size, 3) uint8 from a batch or list of (H, W, 3) images."""
        if isinstance(images, np.ndarray) and images.shape[1] == size == images.shape[2]:
            return images
        if isinstance(images, np.ndarray) and images.shape[1] == images.shape[2]:
            chw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            chw = TF.resize(chw, [size, size], antialias=True)
            return chw.permute(0, 2, 3, 1).numpy()
        return np.stack([fit_square(torch.from_numpy(img), size).numpy() for img in images])

    def _pad_crop_flip(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Zero-pad, crop at offsets from ``keys``, flip where ``keys`` say: -> (B, 3, H, W)."""
        b, h, w, c = x.shape
        pad = crop_padding(self.size)
        span = np.uint64(2 * pad + 1)
        low = np.uint64(0xFFFF)
        dx = ((keys & low) % span).astype(np.intp)
        dy = (((keys >> np.uint64(16)) & low) % span).astype(np.intp)
        flip = ((keys >> np.uint64(32)) & np.uint64(1)).astype(bool)
        padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dtype=x.dtype)
        padded[:, pad:pad + h, pad:pad + w] = x
        windows = sliding_window_view(padded, (h, w), axis=(1, 2))  # (B, 2p+1, 2p+1, C, H, W)
        out = windows[np.arange(b), dy, dx]
        out[flip] = out[flip][..., ::-1]
        return out

    def _rrc_flip(self, images: np.ndarray | list[np.ndarray], keys: np.ndarray) -> np.ndarray:
        """RandomResizedCrop to ``size`` and a horizontal flip, per image: -> (B, 3, S, S)."""
        out = []
        for img, key in zip(images, keys.tolist()):
            top, left, ch, cw = _rrc_params(key, int(img.shape[0]), int(img.shape[1]))
            chw = TF.resized_crop(
                torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), top, left, ch, cw,
                [self.size, self.size], antialias=True,
            )
            if (key >> 40) & 1:
                chw = chw.flip(-1)
            out.append(chw.numpy())
        return np.stack(out)

    def _center(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """Resize the shorter side to size/0.875 and center-crop ``size``: -> (B, 3, S, S)."""
        resize = self.eval_resize
        out = []
        for img in images:
            chw = fit_short(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), resize)
            out.append(TF.center_crop(chw, [self.size, self.size]).numpy())
        return np.stack(out)

    def __call__(
        self, images: np.ndarray | list[np.ndarray], keys: np.ndarray | None
    ) -> torch.Tensor:
        """Augment (when ``keys`` is given) and normalize a batch of (H, W, 3) uint8 images.

        Returns a contiguous float32 tensor (B, 3, S, S). Work is done in NumPy (single-threaded,
        so the data path does not compete with the training's torch threads) except resizing.
        """
        if keys is not None:
            if self.size < SMALL_IMAGE_MAX:
                batch = self._pad_crop_flip(self._as_batch(images, self.size), keys)
            else:
                batch = self._rrc_flip(images, keys)
        elif self.profile == "imagenet":
            batch = self._center(images)
        else:
            batch = self._as_batch(images, self.size).transpose(0, 3, 1, 2)
        return self.normalize(batch)


def fit_short(chw: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (3, H, W) image so that its shorter side is ``size`` (no-op when it is)."""
    if min(chw.shape[-2:]) == size:
        return chw
    return TF.resize(chw, [size], antialias=True)
