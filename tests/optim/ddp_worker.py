"""One rank of the DDP test of the sharpness-aware optimizers (used by test_sharpness_ddp.py).

The test loads this file as a module, forks ``main`` once per rank, and runs the same training in
one process on the whole batch. ``python ddp_worker.py RANK WORLD_SIZE PORT OUT_FILE`` runs one
rank by hand.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mpqkit.optim import ASGA

STEPS = 4
BATCH = 16


def build_model() -> nn.Module:
    """The tiny float64 MLP both runs start from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch; rank r of a world of n takes rows r*BATCH/n to (r+1)*BATCH/n."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[ASGA, list[float]]:
    """STEPS ASGA steps with the explicit two-pass API; returns the optimizer and the radii.

    The bias of the last layer plays the architecture logits: not perturbed, with a penalty
    added once by ``before_update`` (a backward outside the DDP forward).
    """
    net = getattr(model, "module", model)
    logits = net[2].bias
    weights = [p for p in net.parameters() if p is not logits]
    base = torch.optim.SGD(
        [{"params": weights}, {"params": [logits], "lr": 0.05, "perturb": False}],
        lr=0.2,
        momentum=0.9,
    )
    opt = ASGA(base, rho0=0.05, rho_min=0.001, rho_max=0.5, h_ema=0.5, model=model)
    radii = []
    for _ in range(STEPS):
        opt.zero_grad()
        with opt.first_pass_context(model):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
        opt.first_step(loss)
        with opt.second_pass(model):
            loss_adv = nn.functional.mse_loss(model(x), y)
            loss_adv.backward()
        opt.second_step(loss_adv, before_update=lambda: (0.3 * logits.square().sum()).backward())
        radii.append(opt.stats["rho"])
    return opt, radii


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = build_model()
        ddp = DistributedDataParallel(model)
        x, y = make_data()
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt, radii = train(ddp, x[rows], y[rows])
        result: dict[str, Any] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "rho": opt.rho,
            "radii": radii,
            "stats": dict(opt.stats),
        }
        torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry of a forked rank: writes OUT_DIR/rank{rank}.pt."""
    main(rank, world, port, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
