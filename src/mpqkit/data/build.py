"""``build_data``: from a :class:`DataConfig` to a :class:`DataBundle` of ready datasets."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpqkit.data.archive import archive_arrays
from mpqkit.data.config import (
    ENV_DATA_DIR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IN_MEMORY_MAX_IMAGES,
    KNOWN_DATASETS,
    SMALL_IMAGE_MAX,
    SPECS,
    DataBundle,
    DataConfig,
    DatasetSpec,
)
from mpqkit.data.dataset import ArrayStore, FileStore, ImageDataset
from mpqkit.data.decode import load_or_decode
from mpqkit.data.sources import (
    SplitFiles,
    extract_archive,
    find_in_extracted,
    list_split,
    locate_builtin,
    parse_words,
    read_words,
    resolve_cache_dir,
    resolve_data_dir,
)
from mpqkit.data.subset import balanced_subset, check_val_split, parse_amount, split_val
from mpqkit.data.transforms import Pipeline
from mpqkit.errors import ConfigError, DataError

log = logging.getLogger("mpqkit.data")

_PROBE_FILES = 32


@dataclass
class _Splits:
    """Both splits of a dataset before selection."""

    train_store: ArrayStore | FileStore
    eval_store: ArrayStore | FileStore
    classes: list[str]
    class_names: list[str]
    profile: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    in_memory: bool


def _check_numbers(cfg: DataConfig) -> None:
    for field_name in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field_name}={value!r} is invalid: pass an integer >= 1")
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ConfigError(f"workers={cfg.workers!r} is invalid: pass 0 or a positive integer")
    if cfg.input_size is not None and (
        isinstance(cfg.input_size, bool) or not isinstance(cfg.input_size, int)
        or cfg.input_size < 8
    ):
        raise ConfigError(
            f"input_size={cfg.input_size!r} is invalid: pass an integer >= 8, or leave it unset "
            f"for the dataset's native size"
        )
    for field_name in ("mean", "std"):
        value = getattr(cfg, field_name)
        if value is not None and (len(value) != 3 or (field_name == "std" and min(value) <= 0)):
            raise ConfigError(
                f"{field_name}={value!r} is invalid: pass three per-channel values (RGB)"
                + (", all positive" if field_name == "std" else "")
            )


def _stores(
    train: SplitFiles, evals: SplitFiles, *, in_memory: bool, storage: int | None,
    cache_dir: Callable[[], Path], key: str,
) -> tuple[ArrayStore | FileStore, ArrayStore | FileStore]:
    if in_memory:
        assert storage is not None
        cache = cache_dir()
        return (
            ArrayStore(load_or_decode(train, storage, cache, f"{key}-train"), train.labels),
            ArrayStore(load_or_decode(evals, storage, cache, f"{key}-eval"), evals.labels),
        )
    return (
        FileStore(train.paths, train.labels, storage),
        FileStore(evals.paths, evals.labels, storage),
    )


def _builtin(spec: DatasetSpec, cfg: DataConfig) -> _Splits:
    hint = f"{spec.archive} or {spec.folder}/"
    if cfg.download and spec.pickle_folder and cfg.data_dir:
        Path(cfg.data_dir).expanduser().mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(cfg.data_dir, hint)
    cache_dir = functools.partial(resolve_cache_dir, cfg.cache_dir)
    try:
        kind, root = locate_builtin(spec, data_dir)
    except DataError:
        if not (cfg.download and spec.pickle_folder):
            raise
        kind, root = "pickle", data_dir
    size = cfg.input_size or spec.native_size
    mean = tuple(cfg.mean or spec.mean)
    std = tuple(cfg.std or spec.std)
    if kind == "pickle":
        train_ds, test_ds = _load_pickle(spec, root, cfg.download)
        classes = list(train_ds.classes)
        return _Splits(
            ArrayStore(torch.from_numpy(np.ascontiguousarray(train_ds.data)),
                       np.asarray(train_ds.targets)),
            ArrayStore(torch.from_numpy(np.ascontiguousarray(test_ds.data)),
                       np.asarray(test_ds.targets)),
            classes, classes, "small", size, mean, std,  # type: ignore[arg-type]
            str(root / (spec.pickle_folder or "")), True,
        )
    if kind == "archive" and cfg.in_memory is not False:
        train_dec, eval_dec, words = archive_arrays(
            root, spec.folder, ("train", spec.eval_split), spec.native_size, cache_dir(),
            spec.name, spec.words_file,
        )
        names = train_dec.classes
        if spec.words_file:
            names = parse_words((words or b"").decode("utf-8", "replace"), train_dec.classes)
        return _Splits(
            ArrayStore(train_dec.images, train_dec.labels),
            ArrayStore(eval_dec.images, eval_dec.labels),
            train_dec.classes, names, "small", size, mean, std,  # type: ignore[arg-type]
            str(root), True,
        )
    if kind == "archive":
        root = find_in_extracted(extract_archive(root, cache_dir()), spec.folder, "train", root)
    train = list_split(root / "train")
    evals = list_split(root / spec.eval_split, train.classes)
    in_memory = cfg.in_memory
    if in_memory is None:
        in_memory = len(train.paths) + len(evals.paths) <= IN_MEMORY_MAX_IMAGES
    train_store, eval_store = _stores(
        train, evals, in_memory=in_memory, storage=spec.native_size, cache_dir=cache_dir,
        key=spec.name,
    )
    names = train.classes
    if spec.words_file:
        names = read_words(root / spec.words_file, train.classes)
    return _Splits(
        train_store, eval_store, train.classes, names, "small", size, mean, std,  # type: ignore[arg-type]
        str(root), in_memory,
    )


def _load_pickle(spec: DatasetSpec, root: Path, download: bool) -> tuple:
    from torchvision import datasets

    cls = datasets.CIFAR10 if spec.name == "cifar10" else datasets.CIFAR100
    try:
        return (
            cls(str(root), train=True, download=download),
            cls(str(root), train=False, download=download),
        )
    except RuntimeError as exc:
        raise DataError(
            f"{root / (spec.pickle_folder or '')} is incomplete or corrupt "
            f"({' '.join(str(exc).split())}): copy it again, or use {spec.archive} instead"
        ) from None
    except OSError as exc:
        raise DataError(
            f"downloading {spec.name} into {root} failed ({' '.join(str(exc).split())}): "
            f"copy {spec.archive} or {spec.pickle_folder}/ into {root} instead"
        ) from None


def _probe(paths: list[str]) -> set[tuple[int, int]]:
    """Sizes (w, h) of up to _PROBE_FILES images spread over ``paths``."""
    picks = np.unique(np.linspace(0, len(paths) - 1, num=min(_PROBE_FILES, len(paths))).round())
    sizes = set()
    for i in picks.astype(int).tolist():
        try:
            with Image.open(paths[i]) as im:
                sizes.add(im.size)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"image {paths[i]} cannot be read ({' '.join(str(exc).split())}): delete or "
                f"replace the file"
            ) from None
    return sizes


def _imagefolder_root(raw: str, cfg: DataConfig) -> Path:
    if not raw.strip():
        raise DataError(
            "imagefolder: needs a path: pass --data imagefolder:/path/to/tree (data.name in a "
            "config file) with train/ and val/ (or test/) inside"
        )
    path = Path(raw.strip()).expanduser()
    if not path.is_absolute() and not path.exists():
        base = cfg.data_dir or os.environ.get(ENV_DATA_DIR)
        if base and (Path(base).expanduser() / path).exists():
            path = Path(base).expanduser() / path
    if not path.is_dir():
        raise DataError(
            f"image folder {path} does not exist: pass imagefolder:PATH with the folder that "
            f"holds train/ and val/ (or test/)"
        )
    return path


def _imagefolder(raw: str, cfg: DataConfig) -> _Splits:
    root = _imagefolder_root(raw, cfg)
    if not (root / "train").is_dir():
        raise DataError(
            f"image folder {root} has no train/ folder: lay it out as {root}/train/<class>/*.jpg "
            f"and {root}/val/<class>/*.jpg (or test/)"
        )
    eval_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if eval_name is None:
        raise DataError(
            f"image folder {root} has no val/ or test/ folder: add {root}/val/<class>/*.jpg "
            f"for evaluation"
        )
    train = list_split(root / "train")
    evals = list_split(root / eval_name, train.classes)
    sizes = _probe(train.paths) | _probe(evals.paths)
    (w, h) = next(iter(sizes))
    small = len(sizes) == 1 and w == h and w <= SMALL_IMAGE_MAX
    profile = "small" if small else "imagenet"
    size = cfg.input_size or (w if small else 224)
    total = len(train.paths) + len(evals.paths)
    in_memory = cfg.in_memory
    if in_memory is None:
        in_memory = small and total <= IN_MEMORY_MAX_IMAGES
    if small:
        storage: int | None = w
    else:
        storage = int(round(size / 0.875)) if in_memory else None
    key = "imagefolder-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", root.resolve().name) or "root")
    train_store, eval_store = _stores(
        train, evals, in_memory=in_memory, storage=storage,
        cache_dir=functools.partial(resolve_cache_dir, cfg.cache_dir), key=key,
    )
    mean = tuple(cfg.mean or IMAGENET_MEAN)
    std = tuple(cfg.std or IMAGENET_STD)
    return _Splits(
        train_store, eval_store, train.classes, list(train.classes), profile, size,
        mean, std, str(root), in_memory,  # type: ignore[arg-type]
    )


def _fmt(value: float | int | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_data(cfg: DataConfig) -> DataBundle:
    """Locate, decode (once, cached) and select the splits that ``cfg`` asks for.

    Train selection: ``cfg.subset`` (class-balanced, from ``cfg.seed``), then ``cfg.val_split``
    of it held out as ``bundle.val`` (no augmentation). Evaluation split (``test`` for CIFAR,
    ``val`` for Tiny-ImageNet and ImageNet-like folders): ``cfg.test_subset``. Raises
    :class:`DataError` / :class:`ConfigError` with a one-line message naming the fix.
    """
    _check_numbers(cfg)
    subset = parse_amount(cfg.subset, "subset")
    test_subset = parse_amount(cfg.test_subset, "test_subset")
    val_split = check_val_split(cfg.val_split)
    raw_name = (cfg.name or "").strip()
    name = raw_name.lower()
    if name.startswith("imagefolder:"):
        splits = _imagefolder(raw_name.split(":", 1)[1], cfg)
        name = "imagefolder:" + splits.source
        display = Path(splits.source).name
    elif name in SPECS:
        splits = _builtin(SPECS[name], cfg)
        display = name
    else:
        raise DataError(
            f"unknown dataset {raw_name!r}: use one of {', '.join(KNOWN_DATASETS)}"
        )
    pipeline = Pipeline(splits.input_size, splits.profile, splits.mean, splits.std)
    train_labels = splits.train_store.labels
    eval_labels = splits.eval_store.labels
    selected = balanced_subset(train_labels, subset, cfg.seed, "train", "subset")
    train_idx, val_idx = split_val(train_labels, selected, val_split, cfg.seed)
    common = {"classes": splits.classes, "seed": cfg.seed}
    train = ImageDataset(
        splits.train_store, train_idx, pipeline, augment=cfg.augment, split="train", **common
    )
    val = None
    if val_split > 0.0:
        val = ImageDataset(
            splits.train_store, val_idx, pipeline, augment=False, split="val", **common
        )
    test_idx = balanced_subset(eval_labels, test_subset, cfg.seed, "test", "test_subset")
    test = ImageDataset(
        splits.eval_store, test_idx, pipeline, augment=False, split="test", **common
    )
    n_train, n_eval = len(train_labels), len(eval_labels)
    parts = [f"{display} train {len(train)}/{n_train} ("]
    if subset is not None:
        parts.append(f"subset {_fmt(subset)}, ")
    parts.append(f"seed {cfg.seed})")
    if val is not None:
        parts.append(f", val {len(val)} (val_split {val_split:g})")
    parts.append(f"; test {len(test)}/{n_eval}")
    if test_subset is not None:
        parts.append(f" (test_subset {_fmt(test_subset)})")
    where = "in memory" if splits.in_memory else "from files"
    parts.append(f"; {splits.input_size}px, {where}")
    description = "".join(parts)
    log.info("data: %s", description)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(splits.classes),
        input_size=splits.input_size,
        mean=splits.mean,
        std=splits.std,
        class_names=splits.class_names,
        name=name,
        description=description,
        source=splits.source,
        in_memory=splits.in_memory,
        sizes={"train": n_train, "test": n_eval},
    )
