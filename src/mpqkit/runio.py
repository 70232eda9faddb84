"""Files of a run: atomic writes and the run-folder checks shared by every command."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from mpqkit.errors import ConfigError


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader never sees a half-written file, and a killed writer leaves the old file intact.
    The file gets the usual permissions (0666 less the umask), whatever the writer chose.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, _MODE)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def default_run_dir(command: str, *parts: str) -> Path:
    """``runs/COMMAND/PART-PART-YYYYmmdd-HHMMSS`` (``:`` and ``/`` in parts replaced)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "-".join(p.replace(":", "_").replace("/", "_") for p in (*parts, stamp))
    return Path("runs") / command / name


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, resume_file: str,
                    artifacts: Sequence[str], subdirs: Sequence[str] = (),
                    create: bool = True) -> Path:
    """Check ``run_dir`` for the requested mode; clear old artifacts on ``overwrite``.

    A folder holding a run (a ``config.yaml``) is never reused without ``resume`` or
    ``overwrite``; ``resume`` needs ``resume_file`` in it. ``create=False`` (non-main DDP ranks)
    only checks.
    """
    if resume:
        if not (run_dir / resume_file).is_file():
            raise ConfigError(f"nothing to resume in {run_dir}: it holds no {resume_file}; drop "
                              "--resume to start a new run")
    elif (run_dir / "config.yaml").is_file() and not overwrite:
        raise ConfigError(f"run folder {run_dir} already holds a run: pass --resume to continue "
                          "it, --overwrite to replace it, or choose another --out")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for name in artifacts:
                (run_dir / name).unlink(missing_ok=True)
            for name in subdirs:
                shutil.rmtree(run_dir / name, ignore_errors=True)
    return run_dir
