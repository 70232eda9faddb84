"""Datasets and loaders: CIFAR-10/100, Tiny-ImageNet-32 and ImageNet-style image folders.

``build_data(DataConfig(...))`` finds the dataset in ``data_dir`` (or ``$MPQKIT_DATA_DIR``):
an extracted folder (``cifar10-jpeg/{train,test}/<class>/*.jpg``), an archive
(``cifar10-jpeg.tar.gz``, extracted once into ``cache_dir``) or, for CIFAR, torchvision's pickle
folder (``cifar-10-batches-py/``). Small images are decoded once into a uint8 array cached as
``.npy`` in ``cache_dir`` (``$MPQKIT_CACHE_DIR``, default ``~/.cache/mpqkit``); later runs load
it in about a second. Subsets and the validation split are class-balanced and a pure function
of the seed.

``make_loader(dataset, batch_size, train=..., seed=..., epoch=..., start_batch=...)`` gives one
epoch whose order and augmentation are pure functions of (seed, epoch, sample index): a run
resumed with ``start_batch=k`` reproduces an uninterrupted one bit for bit. Under DDP the epoch
is sharded by rank (see :mod:`mpqkit.data.loader`).
"""

from mpqkit.data.build import build_data
from mpqkit.data.config import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN_DATASETS,
    DataBundle,
    DataConfig,
    DataConfigError,
)
from mpqkit.data.dataset import ArrayStore, FileStore, ImageDataset
from mpqkit.data.decode import decode_images
from mpqkit.data.loader import EpochBatchSampler, dist_info, epoch_order, make_loader
from mpqkit.data.transforms import Pipeline, sample_keys

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_DATASETS",
    "ArrayStore",
    "DataBundle",
    "DataConfig",
    "DataConfigError",
    "EpochBatchSampler",
    "FileStore",
    "ImageDataset",
    "Pipeline",
    "build_data",
    "decode_images",
    "dist_info",
    "epoch_order",
    "make_loader",
    "sample_keys",
]
