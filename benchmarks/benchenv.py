"""What a benchmark ran with, printed and stored in its JSON: versions, threads, CPU flags.

Every script in ``benchmarks/`` calls :func:`report_environment` once at start (it prints one
line and returns the dict; it also applies the CPU allocator setting that every mpqkit run has,
:func:`mpqkit.engine.allocator.keep_freed_memory`, so that the figures are those of a run:
``MPQKIT_MALLOC=default`` measures without it) and stores that dict under ``"environment"``
in the JSON it writes, e.g. with :func:`write_json`::

    from benchenv import report_environment, write_json
    env = report_environment(threads=args.threads)
    ...
    write_json(args.out, {"environment": env, ...})
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

#: The /proc/cpuinfo flags that decide which integer/float kernels a CPU library can use.
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "sse4_2", "asimd", "asimddp", "sve", "i8mm")


def cpu_info() -> dict[str, Any]:
    """CPU model name, logical CPUs and which of :data:`CPU_FLAGS` it has (from /proc/cpuinfo;
    on other systems only what :mod:`platform` knows)."""
    info: dict[str, Any] = {"machine": platform.machine(), "logical_cpus": os.cpu_count(),
                            "model": platform.processor() or None, "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not info.get("model_name"):
            info["model"] = value.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
    info["flags"] = [f for f in CPU_FLAGS if f in flags]
    return info


def environment(threads: int | None = None) -> dict[str, Any]:
    """Versions (python, torch, onnxruntime when installed), thread settings, the CPU and the
    allocator setting (applied here, as every mpqkit run applies it)."""
    import torch

    from mpqkit.engine.allocator import keep_freed_memory

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(),
                           "threads_asked": threads,
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                           else None, "cpu": cpu_info(), "allocator": keep_freed_memory()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env


def format_environment(env: dict[str, Any]) -> str:
    cpu = env["cpu"]
    return (f"environment: torch {env['torch']}"
            + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else "")
            + f", threads {env['threads_asked'] if env['threads_asked'] else env['torch_threads']}"
            f" (torch {env['torch_threads']}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); "
            f"CPU {cpu.get('model')} x{cpu.get('logical_cpus')}, flags "
            f"{' '.join(cpu['flags']) or 'unknown'}" + (f"; GPU {env['cuda']}" if env['cuda']
                                                        else "") + f"; {env['allocator']}")


def report_environment(threads: int | None = None) -> dict[str, Any]:
    """Print :func:`format_environment` and return the environment dict."""
    env = environment(threads)
    print(format_environment(env), flush=True)
    return env


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return p
