"""make_loader: deterministic order and augmentation, resume by start_batch, DDP sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mpqkit.data import (
    ArrayStore,
    EpochBatchSampler,
    ImageDataset,
    Pipeline,
    dist_info,
    make_loader,
    sample_keys,
)
from mpqkit.errors import ConfigError

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)


def _dataset(n: int = 37, size: int = 32, augment: bool = True, classes: int = 3) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    labels = np.arange(n) % classes
    return ImageDataset(
        ArrayStore(images, labels), np.arange(n), Pipeline(size, "small", MEAN, STD),
        classes=[str(c) for c in range(classes)], augment=augment, seed=0,
    )


def _epoch(ds, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(make_loader(ds, kw.pop("batch_size", 8), **kw))


def _labels_order(ds, **kw) -> list[int]:
    return torch.cat([y for _, y in _epoch(ds, **kw)]).tolist()


def test_order_is_function_of_seed_and_epoch() -> None:
    ds = _dataset(augment=False)
    ds.store.labels = np.arange(len(ds))  # labels identify samples
    a = _labels_order(ds, train=True, seed=1, epoch=2)
    assert a == _labels_order(ds, train=True, seed=1, epoch=2)
    assert a != _labels_order(ds, train=True, seed=1, epoch=3)
    assert a != _labels_order(ds, train=True, seed=2, epoch=2)
    assert sorted(a) == list(range(37))
    assert _labels_order(ds, train=False) == list(range(37))


def test_items_and_batches_match() -> None:
    ds = _dataset()
    ds.set_epoch(4, seed=9)
    x, y = ds[5]
    xb, yb = ds.get_batch([9, 5, 1])
    assert torch.equal(xb[1], x) and int(yb[1]) == y
    batch = next(iter(make_loader(ds, 5, train=True, seed=9, epoch=4)))
    order = EpochBatchSampler(len(ds), 5, shuffle=True, seed=9, epoch=4).indices()[:5]
    expected = torch.stack([ds[int(i)][0] for i in order])
    assert torch.equal(batch[0], expected)
    assert ds.epoch == 4  # make_loader does not mutate the dataset


def test_augmentation_deterministic_and_per_epoch() -> None:
    ds = _dataset()
    e1 = ds.get_batch(range(10), seed=0, epoch=1)[0]
    assert torch.equal(e1, ds.get_batch(range(10), seed=0, epoch=1)[0])
    assert not torch.equal(e1, ds.get_batch(range(10), seed=0, epoch=2)[0])
    assert not torch.equal(e1, ds.get_batch(range(10), seed=1, epoch=1)[0])
    plain = ds.get_batch(range(10), augment=False)[0]
    assert not torch.equal(e1, plain)
    torch.manual_seed(123)  # the global RNG plays no part
    np.random.seed(5)
    assert torch.equal(e1, ds.get_batch(range(10), seed=0, epoch=1)[0])


def test_pad_crop_flip_matches_reference() -> None:
    ds = _dataset(n=6)
    raw = ds.store.images
    keys = sample_keys(7, 3, np.arange(6))
    got = ds.get_batch(range(6), seed=7, epoch=3)[0]
    for i, key in enumerate(keys.tolist()):
        dx, dy, flip = (key & 0xFFFF) % 9, ((key >> 16) & 0xFFFF) % 9, (key >> 32) & 1
        img = torch.nn.functional.pad(raw[i].permute(2, 0, 1), (4, 4, 4, 4))
        img = img[:, dy:dy + 32, dx:dx + 32]
        if flip:
            img = img.flip(-1)
        ref = ds.pipeline.normalize(img[None].numpy())[0]
        assert torch.equal(got[i], ref)


def test_eval_loader_has_no_augmentation_even_for_train_split() -> None:
    ds = _dataset()
    x, _ = next(iter(make_loader(ds, 37, train=False, epoch=5)))
    ref = ds.pipeline.normalize(ds.store.images.permute(0, 3, 1, 2).numpy())
    assert torch.equal(x, ref) and x.is_contiguous()
    assert abs(float(ref[:, 0].mean()) - (float(ds.store.images[..., 0].float().mean()) / 255
                                          - MEAN[0]) / STD[0]) < 1e-4


@pytest.mark.parametrize("size", [32, 64])
def test_start_batch_reproduces_tail_of_epoch(size: int) -> None:
    ds = _dataset(n=29 if size == 32 else 11, size=size)
    full = _epoch(ds, batch_size=4, train=True, seed=3, epoch=2)
    for k in (1, 3):
        loader = make_loader(ds, 4, train=True, seed=3, epoch=2, start_batch=k)
        assert len(loader) == len(full) - k
        assert loader.batch_sampler.total_batches == len(full)
        tail = list(loader)
        assert len(tail) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], tail):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(make_loader(ds, 4, train=True, seed=3, epoch=2, start_batch=len(full))) == []


def test_start_batch_skips_without_loading(monkeypatch) -> None:
    ds = _dataset()
    loaded: list[int] = []
    real = ds.store.load

    def spy(idx: np.ndarray) -> np.ndarray:
        loaded.extend(idx.tolist())
        return real(idx)

    monkeypatch.setattr(ds.store, "load", spy)
    list(make_loader(ds, 8, train=True, start_batch=4))
    assert len(loaded) == 37 - 32


def test_workers_do_not_change_results() -> None:
    ds = _dataset(n=20)
    a = _epoch(ds, train=True, seed=1, epoch=1, workers=0)
    b = _epoch(ds, train=True, seed=1, epoch=1, workers=1)
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(a, b))


def test_ddp_train_shards_disjoint_equal() -> None:
    n, world = 37, 3
    shares = [
        EpochBatchSampler(n, 4, shuffle=True, seed=5, epoch=1, rank=r, world_size=world).indices()
        for r in range(world)
    ]
    assert all(len(s) == n // world for s in shares)
    flat = np.concatenate(shares)
    assert len(set(flat.tolist())) == len(flat)
    single = EpochBatchSampler(n, 4, shuffle=True, seed=5, epoch=1).indices()
    assert set(flat.tolist()) == set(single[: (n // world) * world].tolist())
    ds = _dataset()
    lens = {len(make_loader(ds, 4, train=True, rank=r, world_size=world)) for r in range(world)}
    assert lens == {3}  # 12 samples per rank


def test_ddp_eval_covers_every_sample_once() -> None:
    ds = _dataset(augment=False)
    ds.store.labels = np.arange(len(ds))
    seen = []
    for r in range(4):
        seen += _labels_order(ds, batch_size=5, train=False, rank=r, world_size=4)
    assert seen == list(range(37))


def test_dist_info_from_torch_distributed(monkeypatch) -> None:
    assert dist_info() == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert dist_info() == (2, 4)
    assert dist_info(rank=0, world_size=2) == (0, 2)
    loader = make_loader(_dataset(), 3, train=True)
    assert (loader.batch_sampler.rank, loader.batch_sampler.world_size) == (2, 4)
    assert len(loader) == 3  # 37 // 4 = 9 samples


def test_drop_last_semantics() -> None:
    assert EpochBatchSampler(33, 8, shuffle=True).total_batches == 4  # lone sample dropped
    assert EpochBatchSampler(34, 8, shuffle=True).total_batches == 5
    assert EpochBatchSampler(33, 8, shuffle=False).total_batches == 5
    assert EpochBatchSampler(34, 8, shuffle=True, drop_last=True).total_batches == 4
    assert EpochBatchSampler(33, 8, shuffle=True, drop_last=False).total_batches == 5
    assert EpochBatchSampler(1, 8, shuffle=True).total_batches == 1


def test_loader_errors() -> None:
    ds = _dataset()
    with pytest.raises(ConfigError, match="start_batch 6 is outside"):
        make_loader(ds, 8, train=True, start_batch=6)
    with pytest.raises(ConfigError, match="start_batch -1"):
        make_loader(ds, 8, train=True, start_batch=-1)
    with pytest.raises(ConfigError, match="batch size 0"):
        make_loader(ds, 0, train=True)
    with pytest.raises(ConfigError, match="rank 3 / world_size 2"):
        make_loader(ds, 8, train=True, rank=3, world_size=2)
    with pytest.raises(ConfigError, match="cannot be shared by 40 ranks"):
        make_loader(ds, 8, train=True, rank=0, world_size=40)


def test_plain_datasets_are_supported() -> None:
    ds = TensorDataset(torch.arange(10).float(), torch.arange(10))
    batches = list(make_loader(ds, 4, train=True, seed=1, epoch=0, start_batch=1))
    assert [len(y) for _, y in batches] == [4, 2]
