"""Configuration and result types of the data layer, and the known datasets."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset

from mpqkit.errors import ConfigError, DataError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENV_DATA_DIR = "MPQKIT_DATA_DIR"
ENV_CACHE_DIR = "MPQKIT_CACHE_DIR"

#: Images at most this many pixels on a side count as "small" (in memory, pad-crop augmentation).
SMALL_IMAGE_MAX = 64
#: Auto in-memory decoding is used for small images up to this many images per dataset.
IN_MEMORY_MAX_IMAGES = 300_000


class DataConfigError(DataError, ConfigError):
    """A data option with an impossible value (subset, val_split): both a DataError and a
    ConfigError, so callers may catch either."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a built-in dataset lives and how it is normalized."""

    name: str
    folder: str  # image-folder tree: <folder>/{train,<eval_split>}/<class>/*.jpg
    archive: str  # <archive> holding <folder>/ (extracted once into the cache dir)
    pickle_folder: str | None  # torchvision python-pickle format (cifar only)
    eval_split: str
    native_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    words_file: str | None = None  # wnid -> names (tiny-imagenet)


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar10", "cifar10-jpeg", "cifar10-jpeg.tar.gz", "cifar-10-batches-py", "test", 32,
        CIFAR10_MEAN, CIFAR10_STD,
    ),
    "cifar100": DatasetSpec(
        "cifar100", "cifar100-jpeg", "cifar100-jpeg.tar.gz", "cifar-100-python", "test", 32,
        IMAGENET_MEAN, IMAGENET_STD,
    ),
    "tiny-imagenet-32": DatasetSpec(
        "tiny-imagenet-32", "tiny-imagenet-200-32px", "tiny-imagenet-200-32px.tar.gz", None,
        "val", 32, IMAGENET_MEAN, IMAGENET_STD, words_file="words.txt",
    ),
}

KNOWN_DATASETS: tuple[str, ...] = (*SPECS, "imagefolder:PATH")


@dataclass
class DataConfig:
    """What to load and how: see the module docstring of :mod:`mpqkit.data` for the details."""

    name: str = "cifar10"
    data_dir: str | None = None
    cache_dir: str | None = None
    subset: float | int | None = None
    test_subset: float | int | None = None
    val_split: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = 0
    augment: bool = True
    in_memory: bool | None = None
    download: bool = False
    seed: int = 0
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None  # override the dataset's normalization
    std: tuple[float, float, float] | None = None


@dataclass
class DataBundle:
    """The splits of one dataset, ready for :func:`mpqkit.data.make_loader`."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]
    name: str
    description: str
    source: str = ""  # the folder or archive the images came from
    in_memory: bool = False
    sizes: dict[str, int] = field(default_factory=dict)  # full split sizes before subsetting
