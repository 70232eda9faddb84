"""The CPU allocator setting of every run: freed memory reused instead of fresh pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpqkit.engine import allocator
from mpqkit.errors import ConfigError

# Allocates and frees 48 MiB (three 16 MiB tensors, the size of ResNet-20 activations at batch
# 256) and prints how much the process's resident memory dropped at the free: glibc's default
# returns the blocks to the system (their next use faults every page in again).
_PROBE = """
import json, os
import torch
from mpqkit.engine.allocator import keep_freed_memory
state = keep_freed_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
ts = [torch.ones(4 << 20) for _ in range(3)]
before = rss_mib()
del ts
print(json.dumps({"returned_mib": before - rss_mib(), "state": state}))
"""


def _probe(setting: str) -> dict:
    env = dict(os.environ, MPQKIT_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_freed_memory_stays_for_reuse():
    keep, default = _probe("keep"), _probe("default")
    assert "keeps freed memory" in keep["state"]
    assert "default" in default["state"]
    assert default["returned_mib"] > 40, default  # measured: 48.0
    assert keep["returned_mib"] < 4, keep  # measured: 0.0


def test_setting_is_validated_and_applied_once(monkeypatch):
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv("MPQKIT_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="MPQKIT_MALLOC='jemalloc' is not a setting"):
        allocator.keep_freed_memory()
    monkeypatch.setenv("MPQKIT_MALLOC", "default")
    assert "MPQKIT_MALLOC=default" in allocator.keep_freed_memory()
    monkeypatch.setenv("MPQKIT_MALLOC", "keep")  # once per process: the first answer stays
    assert "MPQKIT_MALLOC=default" in allocator.keep_freed_memory()
