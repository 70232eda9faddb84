"""ASGA under DistributedDataParallel: 2 CPU processes with gloo against one process."""

from __future__ import annotations

import importlib.util
import multiprocessing
import socket
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.multiprocessing as tmp

WORKER = Path(__file__).with_name("ddp_worker.py")
TIMEOUT_S = 120.0


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mpqkit_test_ddp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(),
    reason="forking worker processes is not available on this platform",
)
def test_ddp_two_ranks_match_each_other_and_single_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    worker = _load_worker()
    outs = [str(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # Forked ranks reuse the imported torch (a spawned one would spend seconds importing it).
    context = tmp.start_processes(
        worker.run_rank,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S:.0f} s")

    ranks = [torch.load(out, weights_only=False) for out in outs]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["rho"] == ranks[1]["rho"]
    assert ranks[0]["radii"] == ranks[1]["radii"]
    assert len(set(ranks[0]["radii"])) > 1  # the adaptive radius moved

    model = worker.build_model()
    x, y = worker.make_data()
    opt, radii = worker.train(model, x, y)
    for p_ddp, p_single in zip(ranks[0]["params"], model.parameters(), strict=True):
        torch.testing.assert_close(p_ddp, p_single.detach(), rtol=1e-10, atol=1e-12)
    assert radii == pytest.approx(ranks[0]["radii"], rel=1e-9, abs=1e-12)
    assert opt.rho == pytest.approx(ranks[0]["rho"], rel=1e-9)
    for key in ("loss", "loss_adv", "h", "grad_norm", "cos_g_gadv"):
        assert opt.stats[key] == pytest.approx(ranks[0]["stats"][key], rel=1e-8, abs=1e-12)
