"""Sharpness of a model: the SAM surrogate gap ``L(theta + rho g/||g||) - L(theta)``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.nn.parallel import DistributedDataParallel

from mpqkit.errors import ConfigError
from mpqkit.optim.bn import frozen_bn_stats

__all__ = ["surrogate_gap"]

LossFn = Callable[..., Tensor]


def _batch_loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    if isinstance(loss_fn, _Loss):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(
                "with a torch.nn loss module every batch must be (inputs, targets); pass "
                "loss_fn(model, batch) -> loss for other batch layouts"
            )
        inputs, targets = batch
        loss = loss_fn(model(inputs), targets)
    else:
        loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError("loss_fn must return a scalar loss tensor; reduce it (e.g. .mean())")
    return loss.reshape(())


def _global_norm(grads: list[Tensor]) -> float:
    if not grads:
        return 0.0
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=dtype).to(device) for g in grads])
    return float(torch.linalg.vector_norm(norms))


def surrogate_gap(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    rho: float,
    params: Iterable[Tensor] | None = None,
) -> float:
    """Average over ``batches`` of ``L(theta + rho * g/||g||) - L(theta)`` (SAM surrogate gap).

    ``loss_fn`` is either a ``torch.nn`` loss module (batches are ``(inputs, targets)``) or a
    callable ``loss_fn(model, batch) -> scalar loss``. ``g`` is the gradient of each batch's loss
    w.r.t. ``params`` (default: every parameter of ``model`` that requires grad, e.g. pass the
    weights only to leave architecture logits out). The model runs in its current mode with its
    running statistics frozen; parameters are restored exactly and ``.grad`` is not touched. A
    DDP model is unwrapped (each rank measures its own batches).
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ConfigError(f"rho must be a number >= 0, got {rho!r}; pass e.g. rho=0.05")
    if isinstance(model, DistributedDataParallel):
        model = model.module
    chosen = list(params) if params is not None else list(model.parameters())
    chosen = [p for p in chosen if p.requires_grad]
    if not chosen:
        raise ConfigError("surrogate_gap() got no parameter that requires grad; pass params=")
    saved = [p.detach().clone() for p in chosen]
    gaps: list[float] = []
    try:
        with frozen_bn_stats(model):
            for batch in batches:
                with torch.enable_grad():
                    loss = _batch_loss(model, loss_fn, batch)
                    grads = torch.autograd.grad(loss, chosen, allow_unused=True)
                pairs = [(p, g) for p, g in zip(chosen, grads, strict=True) if g is not None]
                with torch.no_grad():
                    norm = _global_norm([g for _, g in pairs])
                    if norm > 0 and math.isfinite(norm):
                        for p, g in pairs:
                            p.add_(g.to(p.dtype), alpha=rho / norm)
                    loss_adv = _batch_loss(model, loss_fn, batch)
                    for p, theta in zip(chosen, saved, strict=True):
                        p.copy_(theta)
                gaps.append(float(loss_adv) - float(loss.detach()))
    finally:
        with torch.no_grad():
            for p, theta in zip(chosen, saved, strict=True):
                p.copy_(theta)
    if not gaps:
        raise ConfigError("surrogate_gap() got no batches; pass a non-empty iterable of batches")
    return sum(gaps) / len(gaps)
