"""build_data against the real CIFAR-10 JPEG archive (skipped only when it is absent)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from mpqkit.data import CIFAR10_MEAN, DataConfig, build_data, make_loader

ARCHIVE = "cifar10-jpeg.tar.gz"


def _data_dir() -> Path:
    env = os.environ.get("MPQKIT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    env = os.environ.get("MPQKIT_CACHE_DIR")
    return env if env else str(tmp_path_factory.mktemp("mpqkit-cache"))


def test_real_cifar10_subsets(cache_dir: str) -> None:
    data_dir = _data_dir()
    if not (data_dir / ARCHIVE).is_file() and not (data_dir / "cifar10-jpeg").is_dir():
        pytest.skip(f"{ARCHIVE} not found in {data_dir} (set MPQKIT_DATA_DIR to its folder)")
    b = build_data(DataConfig(
        name="cifar10", data_dir=str(data_dir), cache_dir=cache_dir, subset=500, test_subset=500
    ))
    assert b.num_classes == 10 and b.input_size == 32 and b.mean == CIFAR10_MEAN
    assert b.class_names[:3] == ["airplane", "automobile", "bird"]
    assert b.sizes == {"train": 50000, "test": 10000}
    assert (len(b.train), len(b.test)) == (500, 500)
    assert set(collections.Counter(b.train.targets).values()) == {50}
    assert set(collections.Counter(b.test.targets).values()) == {50}
    assert b.description.startswith("cifar10 train 500/50000 (subset 500, seed 0); test 500/10000")
    x, y = next(iter(make_loader(b.train, 128, train=True, seed=0, epoch=0)))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -0.5 < float(x.mean()) < 0.5 and 0.7 < float(x.std()) < 1.3
    xt, yt = next(iter(make_loader(b.test, 256, train=False)))
    assert xt.shape == (256, 3, 32, 32) and len(yt) == 256
