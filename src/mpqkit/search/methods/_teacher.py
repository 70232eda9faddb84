"""The full-precision model a method needs on the proxy set (GMPQ's teacher, HAWQ's FP model)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mpqkit.engine.checkpoint import load_checkpoint_model
from mpqkit.engine.config import RunConfig
from mpqkit.engine.run import setup_logging
from mpqkit.engine.trainer import train
from mpqkit.errors import ConfigError
from mpqkit.optim.factory import OptimConfig
from mpqkit.search.context import SearchContext

log = logging.getLogger("mpqkit")


@dataclass
class TeacherOptions:
    """Options of a method that needs an FP model of the proxy set (its config derives this)."""

    teacher: str | None = field(default=None, metadata={
        "help": "full-precision checkpoint trained on the proxy set (default: train one "
                "first, unless --weights gives the FP weights)"})
    teacher_epochs: int = field(default=5, metadata={
        "help": "epochs of the FP model trained when none is given"})

    def __post_init__(self) -> None:
        if self.teacher_epochs < 1:
            raise ConfigError(f"teacher_epochs={self.teacher_epochs} must be at least 1")


def proxy_fp_model(ctx: SearchContext, checkpoint: str | None, epochs: int, folder: str,
                   who: str) -> tuple[nn.Module, dict[str, Any]]:
    """An FP model for the proxy set: ``checkpoint``, or trained into ``RUN_DIR/folder``.

    A model trained before in that folder is reused. Returns the model (eval mode, on the
    device, no grads) and a record: ``source`` (``checkpoint:PATH`` or ``trained:PATH``), and for
    a trained one ``epochs``, ``data``, ``top1``, ``reused``, ``train_seconds``.
    """
    if checkpoint:
        model, meta = load_checkpoint_model(checkpoint)
        if meta.get("policy") or int(meta["num_classes"]) != ctx.num_classes:
            raise ConfigError(f"{who} needs a full-precision model for the {ctx.num_classes} "
                              f"classes of the proxy set; {checkpoint} is not one: pass a "
                              "checkpoint of mpqkit train on the proxy set")
        record: dict[str, Any] = {"source": f"checkpoint:{checkpoint}",
                                  "model": meta.get("model")}
    else:
        model, record = _trained(ctx, epochs, folder, who)
    model = model.to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record


def _finished(out: Path, epochs: int) -> bool:
    """Whether the FP run in ``out`` finished ``epochs`` epochs (else it is trained again)."""
    try:
        return int(json.loads((out / "last.json").read_text())["epoch"]) == epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _trained(ctx: SearchContext, epochs: int, folder: str,
             who: str) -> tuple[nn.Module, dict[str, Any]]:
    cfg, out = ctx.cfg, ctx.run_dir / folder
    best = out / "best.safetensors"
    record: dict[str, Any] = {"source": f"trained:{best}", "epochs": epochs,
                              "data": ctx.data.description}
    if best.is_file() and _finished(out, epochs):
        model, meta = load_checkpoint_model(best)
        record.update(top1=(meta.get("metrics") or {}).get("eval_acc"), reused=True)
        return model, record
    log.info(f"{who}: no full-precision weights given (--weights or --teacher): training one "
             f"for {epochs} epoch(s) on {ctx.data.description} into {out} first")
    rc = RunConfig(model=cfg.model, num_classes=ctx.num_classes, weights=cfg.weights,
                   epochs=epochs, max_steps_per_epoch=cfg.max_steps_per_epoch, seed=cfg.seed,
                   device=cfg.device, out=str(out), overwrite=True, save_every_min=0.0,
                   data=copy.deepcopy(cfg.data),
                   optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4,
                                     schedule="cosine"))
    res = train(rc)
    setup_logging(ctx.run_dir, True)  # train() pointed the log at its own folder
    model, _ = load_checkpoint_model(best)
    record.update(top1=res.best_acc, reused=False, train_seconds=round(res.seconds, 3))
    return model, record
