"""Shared fixtures: the bundled data folder, a cache, tiny synthetic image folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$MPQKIT_DATA_DIR``, else ``../shared/data`` beside the repository, if it exists."""
    env = os.environ.get("MPQKIT_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "cifar10-jpeg.tar.gz").is_file() or (cand / "cifar10-jpeg").is_dir():
            return cand
    return None


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Tests decode into their own cache (subprocesses inherit it) unless one is given."""
    if not os.environ.get("MPQKIT_CACHE_DIR"):
        os.environ["MPQKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("mpqkit-cache"))
    yield


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("CIFAR-10 archive not found: set MPQKIT_DATA_DIR to ../shared/data")
    return d


def make_image_folder(root: Path, classes: int = 4, per_class: int = 8, size: int = 32,
                      splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Path:
    """A small ImageFolder tree of JPEGs whose classes differ in colour (learnable)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200 if c < 3 else 100
            for i in range(per_class):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "tiny")
