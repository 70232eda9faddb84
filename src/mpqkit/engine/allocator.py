"""The CPU memory allocator setting every training process runs with.

PyTorch allocates CPU tensors with the C library's ``malloc`` and caches nothing. glibc's
default policy hands large freed blocks back to the operating system (``munmap`` for blocks it
mapped, trimming the heap top above a threshold that adapts to recent frees), so a training step
that frees and re-allocates the same activations gets fresh pages from the kernel every time: a
page fault and a zeroed page per 4 KiB, paid inside whichever operation first writes the tensor
(measured on ResNet-20, batch 128, one CPU thread: up to 60,000 page faults per step).

:func:`keep_freed_memory` sets two glibc ``mallopt`` parameters so that freed memory stays in the
process and is reused:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum): blocks below it come from the heap;
* ``M_TRIM_THRESHOLD`` = 1 GiB: the heap top is returned to the system only above that.

The process then keeps its peak memory instead of returning it between steps (a training
process needs that peak again at the next step anyway). Measured with
``benchmarks/bench_allocator.py`` (one model per process, 3 rounds, 1 thread; the number of
faults under the default policy varies from process to process): the float ResNet-20 step paid
18,600-35,600 page faults and 1.20x its time without the setting, the QAT step up to 13,000
faults and 1.01x; with it, none.
Tensors above 32 MiB (the activations of 224 px models at large batch sizes) are still mapped
per allocation; a caching allocator (``LD_PRELOAD`` of jemalloc or tcmalloc) covers those.

:meth:`mpqkit.engine.run.Run.open` calls it, so every ``train``, ``finetune`` and ``search``
run (and every call of the Python functions behind them) has it; ``MPQKIT_MALLOC=default``
in the environment leaves the C library's policy alone. On a C library other than glibc nothing
is changed and :func:`keep_freed_memory` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from mpqkit.errors import ConfigError

#: glibc's ``mallopt`` parameter numbers (``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
ENV = "MPQKIT_MALLOC"

_state: str | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc


def keep_freed_memory() -> str:
    """Apply the setting of the module docstring once per process; returns what was done (a
    sentence for the run log)."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "keep").strip().lower()
    if choice not in ("keep", "default"):
        raise ConfigError(f"{ENV}={choice!r} is not a setting: use 'keep' (the default: freed "
                          "memory stays in the process) or 'default' (the C library's policy)")
    libc = _glibc() if choice == "keep" else None
    if choice == "default":
        _state = f"CPU allocator: the C library's default ({ENV}=default)"
    elif libc is None:
        _state = "CPU allocator: the C library's default (not glibc: nothing to set)"
    elif libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD,
                                                                          TRIM_THRESHOLD):
        _state = ("CPU allocator: glibc keeps freed memory for reuse (mmap threshold 32 MiB, "
                  f"trim threshold 1 GiB; {ENV}=default turns this off)")
    else:
        _state = "CPU allocator: the C library's default (glibc refused the setting)"
    return _state
