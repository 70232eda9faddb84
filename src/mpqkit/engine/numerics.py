"""Non-finite numbers, found early and named: no NaN is ever trained on, saved or scored silently.

* :func:`first_nonfinite` finds the first non-finite tensor of a named sequence with one fused
  max-abs reduction (one device sync), then names it;
* :func:`check_gradients` runs after ``backward`` and before the optimizer step: a non-finite
  gradient stops the run with the layer it started in (the one nearest the output: NaN spreads
  backwards from there) and, from a diagnostic pass over the same batch, the layer whose output
  first became non-finite;
* :func:`describe_state` names a model's non-finite parameters and floating-point buffers
  (BatchNorm running statistics included), checked after every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from mpqkit.errors import NonFiniteError

__all__ = ["NonFiniteError", "check_gradients", "describe_gradients", "describe_state",
           "first_nonfinite", "forward_origin", "nonfinite_names"]


def _max_abs(tensors: Sequence[Tensor]) -> list[float]:
    """Max-abs of each tensor (NaN and inf propagate), with one host sync per device and dtype."""
    if not tensors:
        return []
    norms = torch._foreach_norm([t.detach() for t in tensors], math.inf)
    return torch.stack([n.float().cpu() for n in norms]).tolist()


def nonfinite_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the floating-point tensors of ``named`` that hold a NaN or an infinity."""
    items = [(n, t) for n, t in named if t is not None and t.is_floating_point() and t.numel()]
    values = _max_abs([t for _, t in items])
    return [n for (n, _), v in zip(items, values, strict=True) if not math.isfinite(v)]


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """Name of the first floating-point tensor of ``named`` holding a NaN or inf, else None."""
    bad = nonfinite_names(named)
    return bad[0] if bad else None


def _kind(t: Tensor) -> str:
    return "nan" if bool(torch.isnan(t).any()) else "inf"


def _module_of(name: str) -> str:
    """The module of a parameter/buffer (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``)."""
    return name.rpartition(".")[0] or name


def forward_origin(model: nn.Module, run: Callable[[], Tensor]) -> tuple[str | None, list[str]]:
    """Run ``run()`` (forward and backward) with hooks; ``(origin, order)``.

    ``origin`` describes the first module, in the order their forward passes end, whose output
    is non-finite while its inputs are finite (None if every output is finite); ``order`` lists
    the modules in that order (a container after its children).
    """
    order: list[str] = []
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple, output: object) -> None:
            order.append(name)
            if found or not isinstance(output, Tensor) or not output.is_floating_point():
                return
            if not bool(torch.isfinite(output).all()):
                ins = [t.detach() for t in inputs
                       if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
                if all(bool(torch.isfinite(t).all()) for t in ins):
                    peak = max((float(t.abs().max()) for t in ins), default=0.0)
                    found.append(f"{name} ({type(mod).__name__}) turned finite inputs "
                                 f"(max-abs {peak:.3g}) into {_kind(output)}")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            run().backward()
    finally:
        for h in handles:
            h.remove()
    return (found[0] if found else None), order


def describe_gradients(model: nn.Module, run: Callable[[], Tensor] | None = None,
                       loss: Tensor | None = None) -> str:
    """Where the non-finite gradients of ``model`` start, in one line (see module docstring)."""
    bad = nonfinite_names((n, p.grad) for n, p in model.named_parameters()
                          if p.grad is not None)
    origin, order = forward_origin(model, run) if run is not None else (None, [])
    rank = {n: i for i, n in enumerate(dict.fromkeys(order))}
    last = max(bad, key=lambda n: rank.get(_module_of(n), -1)) if bad else None
    if loss is not None and not bool(torch.isfinite(loss)):
        text = f"the loss became {loss.item()}"  # every gradient follows; where it began counts
    elif last:
        text = (f"non-finite gradients in {len(bad)} parameter(s), starting at layer "
                f"{_module_of(last)} ({last})")
    else:
        text = "non-finite gradients"
    if origin:
        text += f"; in the forward pass {origin}"
    return text


def check_gradients(model: nn.Module, hint: str, run: Callable[[], Tensor] | None = None,
                    loss: Tensor | None = None) -> None:
    """Raise :class:`NonFiniteError` if ``loss`` or a gradient of ``model`` is NaN or infinite.

    ``run`` recomputes the step's loss on the same batch (for the diagnosis only; the gradients
    are recomputed too, nothing else changes but BatchNorm running statistics).
    """
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if first_nonfinite(grads) is None and (loss is None or bool(torch.isfinite(loss))):
        return
    raise NonFiniteError(f"{describe_gradients(model, run, loss)}: {hint}")


def describe_state(model: nn.Module) -> str | None:
    """Which parameters/float buffers of ``model`` are non-finite, in a phrase; None if none."""
    bad = nonfinite_names(model.state_dict(keep_vars=True).items())
    if not bad:
        return None
    return (f"{len(bad)} tensor(s) of the model are non-finite, first in layer "
            f"{_module_of(bad[0])} ({bad[0]})")
