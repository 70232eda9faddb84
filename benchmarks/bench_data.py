"""Benchmark of the data layer on CIFAR-10: one-off decode, cached load, one training epoch.

Usage::

    PYTHONPATH=src python benchmarks/bench_data.py [--data-dir DIR] [--cache-dir DIR]
        [--batch-size 128] [--workers 0] [--epochs 1] [--out bench.json]

The decode figure is measured in a fresh temporary cache (the archive is read and all 60,000
JPEGs decoded); the epoch figures use ``--cache-dir`` (default ``$MPQKIT_CACHE_DIR`` or
``~/.cache/mpqkit``), filling it on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchenv import report_environment
from mpqkit.data import DataConfig, build_data, make_loader
from mpqkit.data.config import SPECS


def _default_data_dir() -> str:
    env = os.environ.get("MPQKIT_DATA_DIR")
    if env:
        return env
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _one_off_decode(data_dir: str) -> float:
    """Seconds to build CIFAR-10 from scratch (read the archive, decode, write the cache)."""
    with tempfile.TemporaryDirectory(prefix="mpqkit-bench-") as tmp:
        t0 = time.perf_counter()
        build_data(DataConfig(name="cifar10", data_dir=data_dir, cache_dir=tmp))
        return time.perf_counter() - t0


def _epoch(ds, batch_size: int, *, train: bool, epoch: int, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for x, y in make_loader(ds, batch_size, train=train, seed=0, epoch=epoch, workers=workers):
        n += len(y)
        assert x.dtype == torch.float32
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark, print the figures and return them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=_default_data_dir())
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip-decode", action="store_true", help="skip the one-off decode")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    results: dict[str, object] = {
        "environment": report_environment(),
        "dataset": "cifar10",
        "source": str(Path(args.data_dir) / SPECS["cifar10"].archive),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if not args.skip_decode:
        results["decode_s"] = round(_one_off_decode(args.data_dir), 3)
        print(f"one-off decode (read archive + decode 60,000 JPEGs + cache): "
              f"{results['decode_s']:.2f} s")

    cfg = DataConfig(name="cifar10", data_dir=args.data_dir, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    build_data(cfg)
    results["first_build_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    bundle = build_data(cfg)
    results["cached_load_s"] = round(time.perf_counter() - t0, 3)
    print(f"build_data from the cache: {results['cached_load_s']:.2f} s "
          f"(first call in this run: {results['first_build_s']:.2f} s)")

    epochs = []
    for e in range(args.epochs):
        sec, n = _epoch(bundle.train, args.batch_size, train=True, epoch=e, workers=args.workers)
        epochs.append(sec)
        print(f"train epoch {e}: {n} images in {sec:.2f} s = {n / sec:,.0f} images/s "
              f"(augmented, batch {args.batch_size})")
    best = min(epochs)
    results["train_images"] = len(bundle.train)
    results["train_epoch_s"] = round(best, 3)
    results["train_images_per_s"] = round(len(bundle.train) / best, 1)
    sec, n = _epoch(bundle.test, 256, train=False, epoch=0, workers=args.workers)
    results["eval_epoch_s"] = round(sec, 3)
    results["eval_images_per_s"] = round(n / sec, 1)
    print(f"eval pass: {n} images in {sec:.2f} s = {n / sec:,.0f} images/s (batch 256)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
