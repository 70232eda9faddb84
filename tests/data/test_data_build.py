"""build_data on synthetic image-folder trees: sources, subsets, val split, caching, errors."""

from __future__ import annotations

import collections
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpqkit.data import (
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    DataConfig,
    DataConfigError,
    build_data,
)
from mpqkit.data import archive as archive_mod
from mpqkit.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "frog", "ship"]


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def make_tree(
    root: Path, per_class: dict[str, int] | None = None, eval_split: str = "test",
    eval_per_class: int = 3, size: tuple[int, int] = (32, 32), reverse: bool = False,
) -> Path:
    """root/{train,<eval_split>}/<class>/NNNN.jpg with seeded random pixels."""
    per_class = per_class or {c: 10 for c in CLASSES}
    jobs = []
    for ci, (cls, n) in enumerate(per_class.items()):
        for i in range(n):
            jobs.append((root / "train" / cls / f"{i:04d}.jpg", 1000 * ci + i))
        for i in range(eval_per_class):
            jobs.append((root / eval_split / cls / f"{i:04d}.jpg", 50_000 + 1000 * ci + i))
    for path, seed in reversed(jobs) if reverse else jobs:
        _jpeg(path, seed, size)
    return root


def _tar(src: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    return archive


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding a tiny cifar10-jpeg/ folder (4 classes x 10 train, 3 test)."""
    data = tmp_path_factory.mktemp("data")
    make_tree(data / "cifar10-jpeg")
    return data


def _cfg(data_dir: Path, cache: Path, **kw: object) -> DataConfig:
    return DataConfig(name="cifar10", data_dir=str(data_dir), cache_dir=str(cache), **kw)


def _counts(labels: list[int]) -> list[int]:
    c = collections.Counter(labels)
    return [c[i] for i in range(len(CLASSES))]


def _paths(ds) -> list[str]:
    store = ds.store
    if hasattr(store, "paths"):
        return [store.paths[i] for i in ds.indices]
    return ds.indices.tolist()


def test_full_build_shapes_and_metadata(cifar_dir: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(cifar_dir, tmp_path))
    assert b.num_classes == 4 and b.class_names == CLASSES
    assert (len(b.train), len(b.test), b.val) == (40, 12, None)
    assert b.input_size == 32 and b.mean == CIFAR10_MEAN and b.in_memory
    x, y = b.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert b.description.startswith("cifar10 train 40/40 (seed 0); test 12/12")
    assert b.sizes == {"train": 40, "test": 12}


def test_subset_fraction_and_count_are_class_balanced(cifar_dir: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(cifar_dir, tmp_path, subset=0.5, test_subset=4))
    assert _counts(b.train.targets) == [5, 5, 5, 5]
    assert sorted(_counts(b.test.targets)) == [1, 1, 1, 1]
    assert "train 20/40 (subset 0.5, seed 0)" in b.description
    b = build_data(_cfg(cifar_dir, tmp_path, subset=10))
    assert sorted(_counts(b.train.targets)) == [2, 2, 3, 3]
    b = build_data(_cfg(cifar_dir, tmp_path, subset="0.3", test_subset="12"))
    assert _counts(b.train.targets) == [3, 3, 3, 3] and len(b.test) == 12


def test_count_subset_respects_small_classes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_tree(data / "cifar10-jpeg", {"a": 2, "b": 10, "c": 10}, eval_per_class=1)
    b = build_data(_cfg(data, tmp_path / "cache", subset=15))
    assert sorted(collections.Counter(b.train.targets).values()) == [2, 6, 7]


def test_subset_deterministic_from_seed(cifar_dir: Path, tmp_path: Path) -> None:
    a = build_data(_cfg(cifar_dir, tmp_path, subset=0.3, seed=1))
    b = build_data(_cfg(cifar_dir, tmp_path, subset=0.3, seed=1))
    c = build_data(_cfg(cifar_dir, tmp_path, subset=0.3, seed=2))
    assert np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(a.train.indices, c.train.indices)
    bigger = build_data(_cfg(cifar_dir, tmp_path, subset=0.6, seed=1))
    assert set(a.train.indices.tolist()) <= set(bigger.train.indices.tolist())


def test_subset_independent_of_file_creation_order(tmp_path: Path) -> None:
    per = {c: 6 for c in CLASSES[:2]}
    one = make_tree(tmp_path / "one" / "cifar10-jpeg", per, eval_per_class=1)
    two = make_tree(tmp_path / "two" / "cifar10-jpeg", per, eval_per_class=1, reverse=True)
    kw = {"subset": 5, "in_memory": False}
    a = build_data(_cfg(one.parent, tmp_path / "c", **kw))
    b = build_data(_cfg(two.parent, tmp_path / "c", **kw))
    rel_a = [os.path.relpath(p, one) for p in _paths(a.train)]
    rel_b = [os.path.relpath(p, two) for p in _paths(b.train)]
    assert rel_a == rel_b


def test_val_split_disjoint_and_balanced(cifar_dir: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(cifar_dir, tmp_path, val_split=0.2))
    assert b.val is not None
    assert _counts(b.val.targets) == [2, 2, 2, 2] and _counts(b.train.targets) == [8] * 4
    tr, va = set(b.train.indices.tolist()), set(b.val.indices.tolist())
    assert not tr & va and len(tr | va) == 40
    assert not b.val.augment and b.train.augment
    s = build_data(_cfg(cifar_dir, tmp_path, subset=0.5, val_split=0.2))
    assert _counts(s.val.targets) == [1] * 4 and _counts(s.train.targets) == [4] * 4
    assert "val 4 (val_split 0.2)" in s.description


def test_in_memory_and_file_store_give_identical_tensors(cifar_dir: Path, tmp_path: Path) -> None:
    mem = build_data(_cfg(cifar_dir, tmp_path, in_memory=True, subset=8))
    files = build_data(_cfg(cifar_dir, tmp_path, in_memory=False, subset=8))
    assert mem.in_memory and not files.in_memory
    for ds_m, ds_f in ((mem.train, files.train), (mem.test, files.test)):
        ds_m.set_epoch(3)
        ds_f.set_epoch(3)
        xm, ym = ds_m.get_batch(range(len(ds_m)))
        xf, yf = ds_f.get_batch(range(len(ds_f)))
        assert torch.equal(xm, xf) and torch.equal(ym, yf)


def test_decoded_arrays_are_cached(cifar_dir: Path, tmp_path: Path, monkeypatch) -> None:
    build_data(_cfg(cifar_dir, tmp_path))
    assert len(list((tmp_path / "arrays").glob("cifar10-*.npy"))) == 2

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr("mpqkit.data.decode.decode_images", boom)
    assert len(build_data(_cfg(cifar_dir, tmp_path)).train) == 40


def test_archive_decoded_without_extraction_and_cached(
    cifar_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _tar(cifar_dir / "cifar10-jpeg", data / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    from_archive = build_data(_cfg(data, tmp_path / "cache", subset=8))
    from_folder = build_data(_cfg(cifar_dir, tmp_path / "cache2", subset=8))
    assert not (tmp_path / "cache" / "extracted").exists()
    for a, b in ((from_archive.train, from_folder.train), (from_archive.test, from_folder.test)):
        assert torch.equal(a.get_batch(range(len(a)))[0], b.get_batch(range(len(b)))[0])
    monkeypatch.setattr(archive_mod, "_read_members", None)  # a second read would fail
    again = build_data(_cfg(data, tmp_path / "cache", subset=8))
    assert np.array_equal(again.train.indices, from_archive.train.indices)


def test_archive_extracted_once_for_file_reading(cifar_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _tar(cifar_dir / "cifar10-jpeg", data / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    cache = tmp_path / "cache"
    extracted = cache / "extracted"
    extracted.mkdir(parents=True)
    stale = extracted / ".tmp-extract-cifar10-jpeg-999999999-abc"  # a killed extraction
    (stale / "cifar10-jpeg" / "train").mkdir(parents=True)
    b = build_data(_cfg(data, cache, in_memory=False))
    assert not b.in_memory and len(b.train) == 40
    assert (extracted / "cifar10-jpeg" / ".mpqkit-archive.json").is_file()
    assert not stale.exists()
    assert b.source == str(extracted / "cifar10-jpeg" / "cifar10-jpeg")
    mtime = (extracted / "cifar10-jpeg").stat().st_mtime_ns
    build_data(_cfg(data, cache, in_memory=False))
    assert (extracted / "cifar10-jpeg").stat().st_mtime_ns == mtime


def test_tiny_imagenet_archive_with_words(tmp_path: Path) -> None:
    src = tmp_path / "src" / "tiny-imagenet-200-32px"
    make_tree(src, {"n01": 3, "n02": 3}, eval_split="val", eval_per_class=2)
    (src / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tbullfrog\nn03\tx\n")
    data = tmp_path / "data"
    data.mkdir()
    _tar(src, data / "tiny-imagenet-200-32px.tar.gz", "tiny-imagenet-200-32px")
    for _ in range(2):  # decode, then from the cache
        b = build_data(DataConfig(
            name="tiny-imagenet-32", data_dir=str(data), cache_dir=str(tmp_path / "cache")
        ))
        assert b.class_names == ["goldfish", "bullfrog"]
        assert (len(b.train), len(b.test), b.mean) == (6, 4, IMAGENET_MEAN)
    files = build_data(DataConfig(
        name="tiny-imagenet-32", data_dir=str(src.parent), cache_dir=str(tmp_path / "c2")
    ))
    assert files.class_names == ["goldfish", "bullfrog"]


def test_imagefolder_small_and_imagenet_like(tmp_path: Path) -> None:
    small = make_tree(tmp_path / "small", {"a": 3, "b": 3}, eval_split="val", eval_per_class=1)
    b = build_data(DataConfig(name=f"imagefolder:{small}", cache_dir=str(tmp_path / "c")))
    assert (b.input_size, b.in_memory, b.num_classes, b.mean) == (32, True, 2, IMAGENET_MEAN)
    big = make_tree(tmp_path / "big", {"a": 2, "b": 2}, eval_split="test", eval_per_class=1,
                    size=(90, 70))
    b = build_data(DataConfig(name=f"imagefolder:{big}", input_size=64, seed=1))
    assert (b.input_size, b.in_memory) == (64, False)
    b.train.set_epoch(1)
    x, _ = b.train.get_batch([0, 1, 2])
    assert x.shape == (3, 3, 64, 64)
    assert b.test[0][0].shape == (3, 64, 64)
    default = build_data(DataConfig(name=f"imagefolder:{big}", augment=False))
    assert default.input_size == 224 and default.train[0][0].shape == (3, 224, 224)
    mem = build_data(DataConfig(
        name=f"imagefolder:{big}", input_size=64, in_memory=True, cache_dir=str(tmp_path / "c")
    ))
    assert mem.in_memory and mem.test[0][0].shape == (3, 64, 64)


def test_imagefolder_relative_to_data_dir(tmp_path: Path) -> None:
    make_tree(tmp_path / "trees" / "mine", {"a": 2, "b": 2}, eval_split="val", eval_per_class=1)
    b = build_data(DataConfig(
        name="imagefolder:mine", data_dir=str(tmp_path / "trees"), in_memory=False
    ))
    assert b.num_classes == 2


def test_input_size_resizes(cifar_dir: Path, tmp_path: Path) -> None:
    b = build_data(_cfg(cifar_dir, tmp_path, input_size=24, subset=4))
    assert b.train[0][0].shape == (3, 24, 24) and b.test[0][0].shape == (3, 24, 24)
    b = build_data(_cfg(cifar_dir, tmp_path, input_size=64, subset=4))
    assert b.train[0][0].shape == (3, 64, 64) and b.test[0][0].shape == (3, 64, 64)


# ---------------------------------------------------------------------------------- errors


def _raises(exc: type[Exception], match: str, cfg: DataConfig) -> str:
    with pytest.raises(exc, match=match) as info:
        build_data(cfg)
    msg = str(info.value)
    assert "\n" not in msg and ": " in msg
    return msg


def test_error_unknown_dataset(tmp_path: Path) -> None:
    msg = _raises(DataError, "unknown dataset 'mnist'", DataConfig(name="mnist"))
    for known in ("cifar10", "cifar100", "tiny-imagenet-32", "imagefolder:PATH"):
        assert known in msg


def test_error_no_data_dir(monkeypatch) -> None:
    monkeypatch.delenv("MPQKIT_DATA_DIR", raising=False)
    msg = _raises(DataError, "no data folder given", DataConfig(name="cifar10"))
    assert "--data-dir" in msg and "MPQKIT_DATA_DIR" in msg and "cifar10-jpeg.tar.gz" in msg


def test_data_dir_from_env(cifar_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MPQKIT_DATA_DIR", str(cifar_dir))
    monkeypatch.setenv("MPQKIT_CACHE_DIR", str(tmp_path / "envcache"))
    assert len(build_data(DataConfig(name="cifar10")).train) == 40
    assert (tmp_path / "envcache" / "arrays").is_dir()


def test_error_data_dir_missing(tmp_path: Path) -> None:
    msg = _raises(DataError, "does not exist", _cfg(tmp_path / "nope", tmp_path))
    assert str(tmp_path / "nope") in msg and "--data-dir" in msg


def test_error_dataset_not_found(tmp_path: Path) -> None:
    msg = _raises(DataError, "dataset cifar10 not found", _cfg(tmp_path, tmp_path / "c"))
    assert "cifar10-jpeg/" in msg and "cifar10-jpeg.tar.gz" in msg
    assert "cifar-10-batches-py/" in msg
    tiny = DataConfig(name="tiny-imagenet-32", data_dir=str(tmp_path))
    msg = _raises(DataError, "not found", tiny)
    assert "tiny-imagenet-200-32px.tar.gz" in msg


def test_error_empty_folder_and_empty_class(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg" / "train").mkdir(parents=True)
    (tmp_path / "cifar10-jpeg" / "test").mkdir(parents=True)
    _raises(DataError, "has no class subfolders", _cfg(tmp_path, tmp_path / "c"))
    make_tree(tmp_path / "cifar10-jpeg", {"a": 2}, eval_per_class=1)
    (tmp_path / "cifar10-jpeg" / "train" / "b").mkdir()
    (tmp_path / "cifar10-jpeg" / "train" / "b" / "notes.txt").write_text("x")
    msg = _raises(DataError, "has no images", _cfg(tmp_path, tmp_path / "c"))
    assert str(tmp_path / "cifar10-jpeg" / "train" / "b") in msg


def test_error_eval_class_unknown(tmp_path: Path) -> None:
    make_tree(tmp_path / "cifar10-jpeg", {"a": 2}, eval_per_class=1)
    _jpeg(tmp_path / "cifar10-jpeg" / "test" / "zebra" / "0.jpg", 1)
    _raises(DataError, "class folders that the train split lacks", _cfg(tmp_path, tmp_path / "c"))


def test_eval_split_missing_a_class_is_named(tmp_path: Path, caplog) -> None:
    make_tree(tmp_path / "cifar10-jpeg", {"a": 2, "b": 2, "c": 2}, eval_per_class=1)
    for cls in ("b", "c"):
        for f in (tmp_path / "cifar10-jpeg" / "test" / cls).iterdir():
            f.unlink()
        (tmp_path / "cifar10-jpeg" / "test" / cls).rmdir()
    with caplog.at_level("WARNING", logger="mpqkit"):
        bundle = build_data(_cfg(tmp_path, tmp_path / "c"))
    assert bundle.num_classes == 3 and len(bundle.test) == 1
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("no images of 2 of the train split's 3 classes (b, c)" in m for m in msgs), msgs


def test_error_corrupt_archive(tmp_path: Path) -> None:
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"this is not a tar file at all" * 10)
    for in_memory in (None, False):
        msg = _raises(
            DataError, "corrupt or truncated", _cfg(tmp_path, tmp_path / "c", in_memory=in_memory)
        )
        assert "cifar10-jpeg.tar.gz" in msg
    assert not (tmp_path / "c" / "extracted" / "cifar10-jpeg").exists()


def test_error_truncated_archive(cifar_dir: Path, tmp_path: Path) -> None:
    full = _tar(cifar_dir / "cifar10-jpeg", tmp_path / "full.tar.gz", "cifar10-jpeg").read_bytes()
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar10-jpeg.tar.gz").write_bytes(full[: len(full) // 2])
    _raises(DataError, "corrupt or truncated", _cfg(data, tmp_path / "c"))
    _raises(DataError, "corrupt or truncated", _cfg(data, tmp_path / "c", in_memory=False))
    extracted = tmp_path / "c" / "extracted"
    assert not extracted.exists() or [p.name for p in extracted.iterdir()] == [".cifar10-jpeg.lock"]


def test_error_corrupt_image(tmp_path: Path) -> None:
    make_tree(tmp_path / "cifar10-jpeg", {"a": 2}, eval_per_class=1)
    bad = tmp_path / "cifar10-jpeg" / "train" / "a" / "0000.jpg"
    bad.write_bytes(b"garbage")
    msg = _raises(DataError, "cannot be decoded", _cfg(tmp_path, tmp_path / "c"))
    assert str(bad) in msg


def test_error_corrupt_image_in_archive_names_the_member(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src" / "cifar10-jpeg", {"a": 2}, eval_per_class=1)
    (src / "train" / "a" / "0001.png").write_bytes(b"not a png at all" * 4)
    data = tmp_path / "data"
    data.mkdir()
    _tar(src, data / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    msg = _raises(DataError, "cannot be decoded", _cfg(data, tmp_path / "c"))
    assert "cifar10-jpeg.tar.gz:cifar10-jpeg/train/a/0001.png" in msg
    assert "BytesIO" not in msg and " at 0x" not in msg


def test_error_pickle_folder_incomplete(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    _raises(DataError, "incomplete or corrupt", _cfg(tmp_path, tmp_path / "c"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"subset": 41}, "larger than the 40 images"),
        ({"subset": 0}, "must be positive"),
        ({"subset": -0.5}, "must be positive"),
        ({"subset": 1.5}, "fraction above 1"),
        ({"subset": "lots"}, "not a number"),
        ({"test_subset": 13}, "test_subset=13 is larger than the 12"),
        ({"val_split": 1.0}, r"outside \[0, 1\)"),
        ({"val_split": -0.1}, r"outside \[0, 1\)"),
    ],
)
def test_error_bad_subset_or_val_split(cifar_dir: Path, tmp_path: Path, kw, match) -> None:
    msg = _raises(DataConfigError, match, _cfg(cifar_dir, tmp_path, **kw))
    with pytest.raises(DataError):
        build_data(_cfg(cifar_dir, tmp_path, **kw))
    with pytest.raises(ConfigError):
        build_data(_cfg(cifar_dir, tmp_path, **kw))
    assert "pass" in msg


def test_error_bad_numbers(cifar_dir: Path, tmp_path: Path) -> None:
    _raises(ConfigError, "batch_size=0", _cfg(cifar_dir, tmp_path, batch_size=0))
    _raises(ConfigError, "input_size=4", _cfg(cifar_dir, tmp_path, input_size=4))
    _raises(ConfigError, "std=", _cfg(cifar_dir, tmp_path, std=(1.0, 0.0, 1.0)))


def test_error_imagefolder_layout(tmp_path: Path) -> None:
    _raises(DataError, "does not exist", DataConfig(name=f"imagefolder:{tmp_path / 'x'}"))
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    _raises(DataError, "no val/ or test/", DataConfig(name=f"imagefolder:{tmp_path / 't'}"))
    _raises(DataError, "no train/", DataConfig(name=f"imagefolder:{tmp_path}"))
    msg = _raises(DataError, "needs a path", DataConfig(name="imagefolder:"))
    assert "--data imagefolder:" in msg and "--dataset" not in msg


def test_error_cache_not_writable(cifar_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _raises(DataError, "cache folder", _cfg(cifar_dir, blocker / "sub"))
