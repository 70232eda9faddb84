"""Finding a dataset on disk: folders, archives (extracted once into the cache), file listings."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpqkit.data.config import ENV_CACHE_DIR, ENV_DATA_DIR, DatasetSpec
from mpqkit.errors import DataError

log = logging.getLogger("mpqkit.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_MARKER = ".mpqkit-archive.json"
_TMP_PREFIX = ".tmp-extract-"


@dataclass
class SplitFiles:
    """The image files of one split, sorted by path, with their labels."""

    root: Path  # the split folder
    paths: list[str]  # absolute paths, sorted
    labels: np.ndarray  # int64, one per path
    classes: list[str]  # class folder names, index = label

    def fingerprint(self) -> str:
        """Hash of the file list (relative paths, sizes, mtimes) and the label mapping."""
        h = hashlib.sha1()
        h.update("\n".join(self.classes).encode())
        for p, lab in zip(self.paths, self.labels.tolist()):
            st = os.stat(p)
            rel = os.path.relpath(p, self.root)
            h.update(f"\n{rel}\t{lab}\t{st.st_size}\t{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]


def resolve_data_dir(data_dir: str | None, hint: str) -> Path:
    """``data_dir`` or ``$MPQKIT_DATA_DIR`` as an existing folder; ``hint`` names what it holds."""
    raw = data_dir if data_dir else os.environ.get(ENV_DATA_DIR) or None
    if raw is None:
        raise DataError(
            f"no data folder given: pass --data-dir (DataConfig.data_dir) or set {ENV_DATA_DIR} "
            f"to the folder that holds {hint}"
        )
    path = Path(raw).expanduser()
    if not path.exists():
        raise DataError(
            f"data folder {path} does not exist: pass --data-dir or set {ENV_DATA_DIR} to the "
            f"folder that holds {hint}"
        )
    if not path.is_dir():
        raise DataError(
            f"data folder {path} is not a folder: pass --data-dir or set {ENV_DATA_DIR} to the "
            f"folder that holds {hint}"
        )
    return path


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """``cache_dir`` or ``$MPQKIT_CACHE_DIR`` or ``~/.cache/mpqkit``, created if missing."""
    raw = cache_dir or os.environ.get(ENV_CACHE_DIR) or "~/.cache/mpqkit"
    path = Path(raw).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise DataError(
            f"cache folder {path} is not writable ({exc.strerror or exc}): pass --cache-dir or "
            f"set {ENV_CACHE_DIR} to a writable folder"
        ) from None
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (so that DDP ranks do one-off work only once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _archive_id(archive: Path) -> dict[str, object]:
    st = archive.stat()
    return {"archive": archive.name, "size": st.st_size, "mtime": int(st.st_mtime)}


def _remove_stale_temps(parent: Path) -> None:
    """Delete temp folders left by extractions whose process is gone (killed mid-way)."""
    for entry in parent.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(entry.name.rsplit("-", 2)[1])  # <prefix><stem>-<pid>-<random>
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` once into ``cache_dir/extracted/<stem>/`` and return that folder.

    Extraction goes to a temporary folder that is renamed into place only when complete, so a
    killed extraction never leaves a folder that looks finished. A marker records the archive's
    size and mtime; a different archive of the same name is extracted again.
    """
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    parent = cache_dir / "extracted"
    final = parent / stem
    ident = _archive_id(archive)

    def _is_current() -> bool:
        try:
            return json.loads((final / _MARKER).read_text()) == ident
        except (OSError, ValueError):
            return False

    if _is_current():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f".{stem}.lock"):
        if _is_current():
            return final
        _remove_stale_temps(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{stem}-{os.getpid()}-", dir=parent))
        log.info("extracting %s into %s (once)", archive, final)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            (tmp / _MARKER).write_text(json.dumps(ident))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
                raise DataError(
                    f"cannot extract {archive} into {parent} ({exc.strerror}): free space or "
                    f"pass --cache-dir / set {ENV_CACHE_DIR} to a writable folder with room"
                ) from None
            raise DataError(
                f"archive {archive} is corrupt or truncated ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())}): copy "
                f"it again (or delete it to use an extracted folder instead)"
            ) from None
        if final.exists():
            old = parent / f"{_TMP_PREFIX}old-{stem}-{os.getpid()}-0"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    return final


def _has_split(root: Path, split: str) -> bool:
    return (root / split).is_dir()


def find_in_extracted(extracted: Path, folder: str, split: str, archive: Path) -> Path:
    """The dataset root inside an extracted archive: ``<folder>/``, or the top level itself."""
    if _has_split(extracted / folder, split):
        return extracted / folder
    if _has_split(extracted, split):
        return extracted
    subdirs = [d for d in extracted.iterdir() if d.is_dir() and _has_split(d, split)]
    if len(subdirs) == 1:
        return subdirs[0]
    raise DataError(
        f"archive {archive} holds no {folder}/{split}/ folder: use an archive laid out as "
        f"{folder}/{{train,...}}/<class>/*.jpg"
    )


def locate_builtin(spec: DatasetSpec, data_dir: Path) -> tuple[str, Path]:
    """Find ``spec`` in ``data_dir``: ("folder", dataset root), ("archive", archive file) or
    ("pickle", data_dir).

    Looks for, in order: ``<folder>/``; ``data_dir`` itself when it is named ``<folder>``;
    ``<archive>``; the torchvision pickle folder.
    """
    folder = data_dir / spec.folder
    if _has_split(folder, "train"):
        return "folder", folder
    if data_dir.name == spec.folder and _has_split(data_dir, "train"):
        return "folder", data_dir
    archive = data_dir / spec.archive
    if archive.is_file():
        return "archive", archive
    if spec.pickle_folder and (data_dir / spec.pickle_folder).is_dir():
        return "pickle", data_dir
    looked = [f"{spec.folder}/", spec.archive]
    if spec.pickle_folder:
        looked.append(f"{spec.pickle_folder}/")
    fix = "copy one of them there or point --data-dir / MPQKIT_DATA_DIR at the folder that has it"
    if spec.pickle_folder:
        fix += " (or pass --download for torchvision's copy)"
    raise DataError(
        f"dataset {spec.name} not found in {data_dir}: looked for {', '.join(looked)}; {fix}"
    )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def class_index(found: list[str], classes: list[str] | None,
                where: str) -> tuple[list[str], dict[str, int]]:
    """Classes of a split and their label indices: the train split's when given (``classes``);
    a class folder the train split lacks is an error."""
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{where} has class folders that the train split lacks "
                f"({', '.join(unknown[:5])}): make both splits use the same class folder names"
            )
        missing = [c for c in classes if c not in set(found)]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            log.warning(f"{where} has no images of {len(missing)} of the train split's "
                        f"{len(classes)} classes ({', '.join(missing[:5])}{more}): its accuracy "
                        "leaves them out; add their folders for an evaluation of every class")
    return classes, {c: i for i, c in enumerate(classes)}


def list_split(split_dir: Path, classes: list[str] | None = None) -> SplitFiles:
    """List ``split_dir/<class>/**/<image>`` sorted by path (ImageFolder convention).

    With ``classes`` (the train split's classes), the split's class folders must be among them.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"split folder {split_dir} does not exist: lay the dataset out as "
            f"{split_dir.parent}/{{train,val|test}}/<class>/*.jpg"
        )
    found = sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not found:
        raise DataError(
            f"folder {split_dir} has no class subfolders: put the images in "
            f"{split_dir}/<class>/*.jpg (one folder per class)"
        )
    classes, index = class_index(found, classes, f"folder {split_dir}")
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        class_dir = split_dir / name
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...): "
                f"add images or remove the folder"
            )
        files.sort()
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    return SplitFiles(split_dir, paths, np.asarray(labels, dtype=np.int64), list(classes))


def read_words(path: Path, wnids: list[str]) -> list[str]:
    """Class names for ImageNet wnids from ``words.txt`` (first synonym); the wnid if absent."""
    text = ""
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    return parse_words(text, wnids)


def parse_words(text: str, wnids: list[str]) -> list[str]:
    """Class names for ``wnids`` from ``wnid<TAB>name, synonym, ...`` lines; the wnid if absent."""
    wanted = set(wnids)
    names: dict[str, str] = {}
    for line in text.splitlines():
        wnid, _, words = line.partition("\t")
        if wnid in wanted:
            names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in wnids]
