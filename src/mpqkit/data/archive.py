"""Decoding an image-folder archive straight into cached arrays, without extracting it.

Creating tens of thousands of small files is the slow part of extracting CIFAR-10 (tens of
seconds on a busy disk); reading the archive once and decoding the JPEG bytes in memory takes a
few seconds. In-memory datasets are therefore built from the archive stream; the archive is
extracted (once, into the cache) only when images must be read from files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpqkit.data.decode import _CHUNK, decode_into, load_array, save_array
from mpqkit.data.sources import IMG_EXTENSIONS, class_index, file_lock
from mpqkit.errors import DataError

log = logging.getLogger("mpqkit.data")


@dataclass
class DecodedSplit:
    """One split decoded into memory."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def _archive_key(archive: Path) -> str:
    st = archive.stat()
    ident = f"{archive.name}\t{st.st_size}\t{int(st.st_mtime)}"
    return hashlib.sha1(ident.encode()).hexdigest()[:16]


def _corrupt(archive: Path, exc: BaseException) -> DataError:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(
        f"archive {archive} is corrupt or truncated ({type(exc).__name__}: {detail}): copy it "
        f"again (or delete it to use an extracted folder instead)"
    )


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _read_members(
    archive: Path, folder: str, splits: tuple[str, ...], extra: str | None
) -> tuple[dict[str, dict[str, list[tuple[str, bytes]]]], bytes | None]:
    """Per split, per class: (relative path, bytes) of every image; and the ``extra`` file."""
    found: dict[str, dict[str, list[tuple[str, bytes]]]] = {s: {} for s in splits}
    extra_data: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                parts = [p for p in name.split("/") if p]
                if len(parts) > 1 and parts[0] not in found and (
                    parts[0] == folder or parts[1] in found or parts[1] == extra
                ):
                    parts = parts[1:]  # the archive's top folder (normally ``folder``)
                if not parts or parts[0].startswith(".") or ".." in parts or name.startswith("/"):
                    continue
                if member.isfile() and extra is not None and parts == [extra]:
                    fh = tar.extractfile(member)
                    extra_data["x"] = fh.read() if fh else b""
                    continue
                if len(parts) < 2 or parts[0] not in found or parts[1].startswith("."):
                    continue
                classes = found[parts[0]]
                if member.isdir():
                    classes.setdefault(parts[1], [])
                    continue
                if len(parts) < 3 or not member.isfile() or not _is_image(name):
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                classes.setdefault(parts[1], []).append(("/".join(parts[1:]), fh.read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(archive, exc) from None
    return found, extra_data.get("x")


def _split_arrays(
    archive: Path, folder: str, split: str, members: dict[str, list[tuple[str, bytes]]],
    classes: list[str] | None, size: int,
) -> DecodedSplit:
    if not members:
        raise DataError(
            f"archive {archive} holds no {folder}/{split}/<class>/ images: use an archive laid "
            f"out as {folder}/{{train,...}}/<class>/*.jpg"
        )
    found = sorted(members)
    for name in found:
        if not members[name]:
            raise DataError(
                f"class folder {folder}/{split}/{name} in {archive} has no images: add images "
                f"or remove the folder from the archive"
            )
    classes, index = class_index(found, classes, f"{folder}/{split}/ in {archive}")
    items: list[tuple[str, bytes]] = []
    labels: list[int] = []
    for name in found:
        files = sorted(members[name])
        items.extend(files)
        labels.extend([index[name]] * len(files))
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    view = torch.from_numpy(out)
    for start in range(0, len(items), _CHUNK):
        chunk = items[start:start + _CHUNK]
        datas = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in chunk]
        names = [f"{archive}:{folder}/{split}/{rel}" for rel, _ in chunk]
        decode_into(view, start, datas, names)
    return DecodedSplit(torch.from_numpy(out), np.asarray(labels, dtype=np.int64), classes)


def archive_arrays(
    archive: Path, folder: str, splits: tuple[str, str], size: int, cache_dir: Path, key: str,
    extra: str | None = None,
) -> tuple[DecodedSplit, DecodedSplit, bytes | None]:
    """(train, eval) splits of an image-folder archive decoded to uint8 arrays, cached.

    The cache is keyed by the archive's name, size and mtime:
    ``cache_dir/arrays/<key>-<split>-<size>px-a<hash>.npy`` (+ ``.labels.npy``) and a ``.json``
    written last, holding the classes and the ``extra`` file (e.g. ``words.txt``) lines needed.
    """
    arrays = cache_dir / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)
    base = arrays / f"{key}-{size}px-a{_archive_key(archive)}"
    meta_path = base.with_name(base.name + ".json")

    def _load() -> tuple[DecodedSplit, DecodedSplit, bytes | None] | None:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        out = []
        for split in splits:
            info = meta.get(split) or {}
            n = int(info.get("count", -1))
            labels = load_array(base.with_name(f"{base.name}-{split}.labels.npy"), (n,), np.int64)
            images = load_array(
                base.with_name(f"{base.name}-{split}.npy"), (n, size, size, 3), np.uint8
            )
            if labels is None or images is None:
                return None
            out.append(DecodedSplit(torch.from_numpy(images), labels, list(meta["classes"])))
        extra_text = meta.get("extra")
        return out[0], out[1], None if extra_text is None else extra_text.encode()

    cached = _load()
    if cached is not None:
        return cached
    with file_lock(arrays / f".{key}.lock"):
        cached = _load()
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        log.info("decoding %s into %s (once)", archive, arrays)
        members, extra_data = _read_members(archive, folder, splits, extra)
        train = _split_arrays(archive, folder, splits[0], members[splits[0]], None, size)
        evals = _split_arrays(
            archive, folder, splits[1], members[splits[1]], train.classes, size
        )
        del members
        meta: dict[str, object] = {"classes": train.classes}
        ok = True
        for split, dec in zip(splits, (train, evals)):
            ok &= save_array(base.with_name(f"{base.name}-{split}.labels.npy"), dec.labels)
            ok &= save_array(base.with_name(f"{base.name}-{split}.npy"), dec.images.numpy())
            meta[split] = {"count": len(dec.labels)}
        if extra_data is not None:
            meta["extra"] = _relevant_lines(extra_data, train.classes)
        if ok:
            save_text(meta_path, json.dumps(meta))
        log.info(
            "decoded %d images in %.1f s", len(train.labels) + len(evals.labels),
            time.perf_counter() - t0,
        )
    extra_out = meta.get("extra") if extra_data is not None else None
    return train, evals, None if extra_out is None else str(extra_out).encode()


def _relevant_lines(data: bytes, classes: list[str]) -> str:
    """The lines of a ``wnid<TAB>words`` file that name one of ``classes``."""
    wanted = set(classes)
    text = data.decode("utf-8", errors="replace")
    return "".join(
        line + "\n" for line in text.splitlines() if line.split("\t", 1)[0] in wanted
    )


def save_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.replace(target)
