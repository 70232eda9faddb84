"""Decoding images to uint8 tensors, and the on-disk cache of decoded splits."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from mpqkit.data.sources import SplitFiles, file_lock
from mpqkit.errors import DataError

log = logging.getLogger("mpqkit.data")

_JPEG = (".jpg", ".jpeg")
_CHUNK = 512


def _one_line(exc: BaseException) -> str:
    # PIL names the stream it read ("cannot identify image file <_io.BytesIO object at 0x..>"),
    # which says nothing: the caller names the file or archive member
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(exc))
    return " ".join(text.split()) or type(exc).__name__


def _bad_image(path: str, exc: BaseException) -> DataError:
    return DataError(
        f"image {path} cannot be decoded ({_one_line(exc)}): delete or replace the file"
    )


def _read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    return torch.frombuffer(data, dtype=torch.uint8)


def _decode_pil(source: str | bytes, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad_image(name, exc) from None
    return torch.from_numpy(arr.copy())


def _decode_one(data: torch.Tensor, name: str) -> torch.Tensor:
    """Decode encoded bytes (uint8 tensor) named ``name`` to (H, W, 3) uint8."""
    if name.lower().endswith(_JPEG):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0)
        except (RuntimeError, ValueError):
            pass  # CMYK/progressive oddities and non-JPEG content: let PIL try
    return _decode_pil(data.numpy().tobytes(), name)


def decode_file(path: str) -> torch.Tensor:
    """Decode one image file to an RGB uint8 tensor (H, W, 3)."""
    try:
        data = _read_bytes(path)
    except OSError as exc:
        raise _bad_image(path, exc) from None
    return _decode_one(data, path)


def fit_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side of an (H, W, 3) uint8 image to ``size``, then center-crop square."""
    h, w = img.shape[0], img.shape[1]
    if h == size and w == size:
        return img
    chw = img.permute(2, 0, 1)
    if min(h, w) != size:
        chw = TF.resize(chw, [size], antialias=True)
    chw = TF.center_crop(chw, [size, size])
    return chw.permute(1, 2, 0)


def decode_into(out: torch.Tensor, start: int, datas: list[torch.Tensor], names: list[str]) -> None:
    """Decode encoded images ``datas`` into ``out[start:start+len(datas)]`` ((N, S, S, 3) uint8).

    JPEGs are decoded as one batch with ``torchvision.io.decode_jpeg``; other formats with PIL.
    Images of another size are resized (shorter side) and center-cropped to S.
    """
    size = out.shape[1]
    jpeg_pos = [i for i, n in enumerate(names) if n.lower().endswith(_JPEG)]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg_pos:
        try:
            imgs = decode_jpeg([datas[i] for i in jpeg_pos], mode=ImageReadMode.RGB)
            decoded = {i: im.permute(1, 2, 0) for i, im in zip(jpeg_pos, imgs)}
        except (RuntimeError, ValueError):
            decoded = {}  # one bad file spoils the batch: decode one by one below
    for i, name in enumerate(names):
        img = decoded.get(i)
        if img is None:
            img = _decode_one(datas[i], name)
        out[start + i] = fit_square(img, size)


def decode_images(paths: list[str], size: int) -> np.ndarray:
    """Decode image files into one uint8 array (N, size, size, 3), in batches of 512."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    view = torch.from_numpy(out)
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start:start + _CHUNK]
        datas = []
        for path in chunk:
            try:
                datas.append(_read_bytes(path))
            except OSError as exc:
                raise _bad_image(path, exc) from None
        decode_into(view, start, datas, chunk)
    return out


def save_array(target: Path, arr: np.ndarray) -> bool:
    """Write ``arr`` to ``target`` (.npy) atomically; False (with a warning) when it cannot."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        log.warning("could not cache decoded images at %s (%s)", target, _one_line(exc))
        return False
    return True


def load_array(target: Path, shape: tuple[int, ...] | None, dtype: type) -> np.ndarray | None:
    """The cached array at ``target`` if readable and of that shape (None: any) and dtype."""
    if not target.is_file():
        return None
    try:
        arr = np.load(target, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable cache %s (%s)", target, _one_line(exc))
        return None
    if (shape is not None and arr.shape != shape) or arr.dtype != dtype:
        return None
    return arr


def load_or_decode(files: SplitFiles, size: int, cache_dir: Path, key: str) -> torch.Tensor:
    """The split's images as a uint8 tensor (N, size, size, 3), decoded once and cached as .npy.

    The cache file is ``cache_dir/arrays/<key>-<size>px-<hash of the file list>.npy``; it is
    written to a temporary name and renamed, so a killed run never leaves a partial cache.
    """
    folder = cache_dir / "arrays"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{key}-{size}px-{files.fingerprint()}.npy"

    def _load() -> torch.Tensor | None:
        arr = load_array(target, (len(files.paths), size, size, 3), np.uint8)
        return None if arr is None else torch.from_numpy(arr)

    cached = _load()
    if cached is not None:
        return cached
    with file_lock(folder / f".{key}.lock"):
        cached = _load()
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        log.info("decoding %d images of %s into %s (once)", len(files.paths), key, target)
        arr = decode_images(files.paths, size)
        save_array(target, arr)
        log.info("decoded %d images in %.1f s", len(files.paths), time.perf_counter() - t0)
    return torch.from_numpy(arr)
