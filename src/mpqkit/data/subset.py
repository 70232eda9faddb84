"""Class-balanced, seed-deterministic subsets and validation splits."""

from __future__ import annotations

import math
import zlib

import numpy as np

from mpqkit.data.config import DataConfigError
from mpqkit.data.transforms import mix_seed


def parse_amount(value: float | int | str | None, what: str) -> float | int | None:
    """Normalize a subset option: None, a fraction in (0, 1] (float) or an image count (int).

    Strings from a command line are accepted: ``"0.05"`` is a fraction, ``"2500"`` a count.
    """
    if value is None:
        return None
    fix = f"pass {what} as a fraction in (0, 1] (e.g. 0.05) or an image count (e.g. 2500)"
    if isinstance(value, bool):
        raise DataConfigError(f"{what}={value!r} is not a size: {fix}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise DataConfigError(f"{what}={text!r} is not a number: {fix}") from None
    if isinstance(value, (int, np.integer)):
        if value <= 0:
            raise DataConfigError(f"{what}={value} must be positive: {fix}")
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value) or value <= 0.0:
            raise DataConfigError(f"{what}={value} must be positive: {fix}")
        if value > 1.0:
            if value.is_integer():
                return int(value)
            raise DataConfigError(f"{what}={value} is a fraction above 1: {fix}")
        return value
    raise DataConfigError(f"{what}={value!r} has type {type(value).__name__}: {fix}")


def class_orders(labels: np.ndarray, seed: int, salt: str) -> dict[int, np.ndarray]:
    """Per class, that class's sample indices in a seeded random order (sorted input first)."""
    salt_int = zlib.crc32(salt.encode())
    orders: dict[int, np.ndarray] = {}
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng(mix_seed(seed, salt_int, c))
        orders[c] = members[rng.permutation(len(members))]
    return orders


def _allocate(sizes: dict[int, int], count: int, seed: int, salt: str) -> dict[int, int]:
    """Spread ``count`` over classes as evenly as their sizes allow; the remainder goes to
    classes in a seeded order."""
    alloc = {c: 0 for c in sizes}
    rng = np.random.default_rng(mix_seed(seed, zlib.crc32(salt.encode()), 0xA110C))
    order = [list(sizes)[i] for i in rng.permutation(len(sizes))]
    remaining = count
    while remaining > 0:
        open_classes = [c for c in order if alloc[c] < sizes[c]]
        q, r = divmod(remaining, len(open_classes))
        for pos, c in enumerate(open_classes):
            alloc[c] += min(q + (1 if pos < r else 0), sizes[c] - alloc[c])
        remaining = count - sum(alloc.values())
    return alloc


def balanced_subset(
    labels: np.ndarray, amount: float | int | None, seed: int, salt: str, what: str = "subset"
) -> np.ndarray:
    """Sorted indices of a class-balanced selection of ``labels``.

    ``amount`` None keeps everything; a fraction keeps that share of every class (rounded, at
    least one image per class); a count is spread evenly over the classes. The choice depends
    only on (labels, amount, seed, salt); with the same seed a larger fraction keeps a superset.
    """
    n = len(labels)
    if amount is None:
        return np.arange(n)
    orders = class_orders(labels, seed, salt)
    sizes = {c: len(o) for c, o in orders.items()}
    if isinstance(amount, float):
        take = {c: max(1, int(math.floor(amount * s + 0.5))) for c, s in sizes.items()}
    else:
        if amount > n:
            raise DataConfigError(
                f"{what}={amount} is larger than the {n} images of the split: pass at most {n} "
                f"or a fraction in (0, 1]"
            )
        take = _allocate(sizes, amount, seed, salt)
    picked = [orders[c][:k] for c, k in take.items()]
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)


def split_val(
    labels: np.ndarray, selected: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``selected`` (indices into ``labels``) into (train, val), class-balanced.

    Every class gives ``round(fraction * its count)`` images to val, at least one when it has two
    or more, and always keeps one for training.
    """
    if fraction == 0.0:
        return selected, np.arange(0)
    sub_labels = labels[selected]
    orders = class_orders(sub_labels, seed, "val")
    val_parts = []
    for members in orders.values():
        k = len(members)
        v = int(math.floor(fraction * k + 0.5))
        v = min(max(v, 1 if k >= 2 else 0), k - 1)
        val_parts.append(members[:v])
    val_pos = np.sort(np.concatenate(val_parts)) if val_parts else np.arange(0)
    mask = np.ones(len(selected), dtype=bool)
    mask[val_pos] = False
    return selected[mask], selected[val_pos]


def check_val_split(value: float) -> float:
    """``value`` as a float in [0, 1), else a DataConfigError naming the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise DataConfigError(
            f"val_split={value!r} is not a number: pass a fraction in [0, 1), e.g. 0.1"
        )
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise DataConfigError(
            f"val_split={value} is outside [0, 1): pass a fraction such as 0.1 (0 for no val split)"
        )
    return v
