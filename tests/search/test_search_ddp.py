"""A supernet search on 2 CPU processes (gloo) against one process on the whole batch.

Each rank takes a disjoint half of every batch (batch 8 per rank), averages the gradients of
the weights and the logits, and normalizes with the statistics of the global batch; after two
steps of EdMIPS and of ASGA the supernet (weights, logits, BatchNorm statistics, quantizer
steps) and lambda must be those of one process with batch 16, up to rounding; the two ranks
agree bit for bit. Rank 1 writes nothing into the run folder.

The tolerance: the sums over the batch are taken in another order (half-batch sums added over
ranks; BatchNorm's mean and variance from those sums instead of one kernel), which changes the
last bits of the activations. In float32 such a 1-ulp change flips the rounding of some
quantized activations (a jump of one quantization step) and Adam's first steps move a logit by
about ``lr_alpha`` whatever the size of its gradient, so float32 runs agree only statistically
(measured: logits 0.1 apart after one step). The test therefore runs in float64 (the model, the
data): the remaining differences come from the quantizers, which round in float32 whatever the
input's dtype; measured max |diff| over all supernet tensors after 2 steps: 3e-8 (EdMIPS),
1e-6 (ASGA, the steps of the fc quantizer), hence ``ATOL = RTOL = 1e-5``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import mpqkit.data.loader as loader
from mpqkit.data import DataConfig
from mpqkit.search import SearchConfig, loop, search

METHODS = ("edmips", "asga")
TIMEOUT_S = 120.0
ATOL = RTOL = 1e-5  # see the module docstring


def _config(folder: Path, out: Path, method: str, batch: int) -> SearchConfig:
    return SearchConfig(model="resnet20", method=method, epochs=1, max_steps_per_epoch=2,
                        budget="w3a3", dual="inequality", lambda_init=0.5, out=str(out),
                        overwrite=True, progress=False, device="cpu",
                        data=DataConfig(name=f"imagefolder:{folder}", batch_size=batch,
                                        cache_dir=str(folder.parent / "cache")))


def _searched(cfg: SearchConfig) -> dict[str, Any]:
    """The supernet's final state, lambda and the policy of ``search(cfg)``."""
    box: list[loop.SupernetSearch] = []
    init = loop.SupernetSearch.__init__

    def capture(self: loop.SupernetSearch, *a: Any) -> None:
        init(self, *a)
        box.append(self)

    loop.SupernetSearch.__init__ = capture  # type: ignore[method-assign]
    try:
        result = search(cfg)
    finally:
        loop.SupernetSearch.__init__ = init  # type: ignore[method-assign]
    s = box[0]
    return {"state": {k: v.detach().clone() for k, v in s.supernet.state_dict().items()},
            "lambda": s.dual.value, "steps": s.counters.steps,
            "images": s.counters.images_processed, "bits": result.policy.bits()}


def _watch_writes(root: Path, seen: list[str]) -> None:
    """Record every file opened for writing, made, moved or removed under ``root``."""
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write)
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink",
                       "shutil.rmtree"):
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, str | os.PathLike) and str(path).startswith(str(root)):
            seen.append(f"{event} {path}")

    sys.addaudithook(hook)


def _rank(rank: int, world: int, port: int, folder: str, root: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    writes: list[str] = []
    if rank > 0:
        _watch_writes(Path(root) / "runs", writes)
    try:
        out = {m: _searched(_config(Path(folder), Path(root) / "runs" / m, m, 8))
               for m in METHODS}
        torch.save({"runs": out, "writes": writes}, Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="forking worker processes is not available on this platform")
def test_two_ranks_search_as_one_process_on_the_whole_batch(
        tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_folder  # 32 training images of 32x32, 4 classes
    monkeypatch.setattr(loader, "_collated", lambda b: (b[0].double(), b[1]))
    torch.set_default_dtype(torch.float64)  # the model too (the forked ranks inherit both)
    try:
        # one process, batch 16 (also fills the decode cache the ranks then read)
        single = {m: _searched(_config(folder, tmp_path / "single" / m, m, 16))
                  for m in METHODS}
        # forked ranks reuse the imported torch (a spawned one spends seconds importing it)
        ctx = tmp.start_processes(_rank, args=(2, _free_port(), str(folder), str(tmp_path)),
                                  nprocs=2, join=False, start_method="fork")
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the 2 search processes did not finish within {TIMEOUT_S:.0f} s")
    finally:
        torch.set_default_dtype(torch.float32)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1]["writes"] == []
    for m in METHODS:
        one, r0, r1 = single[m], ranks[0]["runs"][m], ranks[1]["runs"][m]
        for k, v in r0["state"].items():  # the ranks agree bit for bit
            assert torch.equal(v, r1["state"][k]), (m, k)
        assert r0["lambda"] == r1["lambda"] and r0["bits"] == r1["bits"]
        for k, v in one["state"].items():
            if v.is_floating_point():
                torch.testing.assert_close(r0["state"][k], v, atol=ATOL, rtol=RTOL,
                                           msg=lambda s, m=m, k=k: f"{m} {k}: {s}")
            else:
                assert torch.equal(r0["state"][k], v), (m, k)
        assert r0["lambda"] == pytest.approx(one["lambda"], abs=1e-9) and one["lambda"] != 0.5
        assert r0["bits"] == one["bits"]
        assert (r0["steps"], r0["images"]) == (one["steps"], one["images"])
        run = tmp_path / "runs" / m
        assert {p.name for p in run.iterdir()} >= {"policy.json", "search.csv", "alpha.json",
                                                    "last.safetensors", "log.txt"}
        assert "x 2 processes" in (run / "log.txt").read_text()
