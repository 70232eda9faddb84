"""Sharpness-aware optimizer wrappers around any ``torch.optim.Optimizer``: SAM, GSAM and ASGA.

One step takes two forward-backward passes on the same batch::

    g      = grad L(theta)                                   pass 1
    e      = (rho / ||g|| - gamma) * g                       perturbation of the perturbed groups
    g_adv  = grad L(theta + e)                               pass 2, BatchNorm statistics frozen
    h      = L(theta + e) - L(theta)                         surrogate gap
    theta <- base_step(theta, d)                             after restoring theta exactly

with the update direction ``d`` chosen by ``update``:

* ``"adv"``:  ``d = g_adv`` (SAM when ``gamma = 0``),
* ``"mean"``: ``d = (g + g_adv) / 2`` (SAGM / ASGA implicit gradient alignment),
* ``"gsam"``: ``d = g_adv - alpha * g_perp``, ``g_perp`` the part of ``g`` orthogonal to ``g_adv``
  (GSAM, ICLR 2022).

With ``adaptive=True`` the radius of the next step is ``clamp(ln(1 + h), rho_min, rho_max)``,
``h`` the gap of the previous step (``rho0`` on the first), negative gaps counted as 0, optionally
smoothed by ``h_smooth = h_ema * h_smooth + (1 - h_ema) * h`` (started at the first gap).
``adaptive=False`` keeps ``rho = rho0`` (SAGM). Explicit two-pass form, e.g. a supernet search
whose complexity penalty acts on the architecture logits (a param group with ``"perturb": False``)::

    opt.zero_grad()
    with opt.first_pass_context(model):              # model.no_sync() under DDP
        loss = crit(model(x), y)
        loss.backward()
    opt.first_step(loss)                             # params -> theta + e, grads -> None
    with opt.second_pass(model):                     # BatchNorm running stats frozen
        loss_adv = crit(model(x), y)
        loss_adv.backward()
    opt.second_step(loss_adv, before_update=lambda: (lam * complexity(logits)).backward())

The penalty is left out of both losses and added once, at ``theta``, by ``before_update``.
``opt.step(closure)`` runs both passes with a closure that zeroes the grads, runs forward and
backward, and returns the loss.

AMP: backward ``scaler.scale(loss)`` in both passes, pass the *unscaled* losses and the same
``scaler`` to ``first_step`` and ``second_step`` (they divide the grads by the scale; do not call
``scaler.unscale_``), then call ``scaler.update()``. A step with inf/nan grads is skipped with
``theta`` restored, and the scale backs off.

DDP: run pass 1 inside ``opt.first_pass_context(ddp_model)`` (``no_sync``): ``first_step``
all-reduces the pass-1 grads itself (one flat all-reduce per dtype), DDP averages those of pass 2,
and the losses are averaged over ranks so that ``h`` and ``rho`` agree on every rank. Pass
``distributed=False`` when the model is not data-parallel although a process group exists.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from mpqkit.errors import CheckpointError, ConfigError
from mpqkit.optim.bn import frozen_bn_stats

__all__ = ["ASGA", "GSAM", "SAM", "UPDATES", "GradScalerLike", "SharpnessAware"]

UPDATES = ("mean", "adv", "gsam")
_STATE_KEY = "sharpness_aware"
_BUCKET_NUMEL = 1 << 24


class GradScalerLike(Protocol):
    """What the wrapper needs from a ``torch.amp.GradScaler``."""

    def get_scale(self) -> float: ...

    def step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any: ...


def _delegated(name: str) -> property:
    """An attribute that lives on the base optimizer once the wrapper is built."""
    private = f"_init_{name}"

    def fget(self: SharpnessAware) -> Any:
        if self.__dict__.get("_ready", False):
            return getattr(self.base_optimizer, name)
        return self.__dict__[private]

    def fset(self: SharpnessAware, value: Any) -> None:
        if self.__dict__.get("_ready", False):
            setattr(self.base_optimizer, name, value)
        else:
            self.__dict__[private] = value

    return property(fget, fset, doc=f"``base_optimizer.{name}`` (shared, not a copy).")


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}; pass e.g. {name}=0.05")
    value = float(value)
    if value < low or (high is not None and value >= high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ConfigError(f"{name} must be {bounds}, got {value}; pass a value {bounds}")
    return value


def _scalar(value: Tensor | float, what: str) -> Tensor | float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}; "
                f"pass the reduced loss (e.g. {what}.mean())"
            )
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a scalar tensor or a float, got {type(value).__name__}")
    return float(value)


def _flat(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.cat([t.reshape(-1).to(device, dtype) for t in tensors])


def _sum_dots(a: list[Tensor], b: list[Tensor] | None, device: torch.device,
              dtype: torch.dtype) -> Tensor:
    """``sum_i <a_i, b_i>`` (``b`` None: ``sum_i ||a_i||^2``) in ``dtype``, as one dot product of
    the concatenated tensors: one kernel instead of one per parameter (the per-parameter calls
    cost more than the arithmetic for a network's few hundred tensors)."""
    if not a:
        return torch.zeros((), device=device, dtype=dtype)
    fa = _flat(a, device, dtype)
    return torch.dot(fa, fa if b is None else _flat(b, device, dtype))


def _stat_dtype(entries: list[tuple[Tensor, bool]]) -> torch.dtype:
    """float64 statistics for float64 models (exact tests), float32 otherwise."""
    return torch.float64 if any(p.dtype == torch.float64 for p, _ in entries) else torch.float32


def _as_tensor(value: Tensor | float, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device, dtype).reshape(())
    return torch.tensor(value, device=device, dtype=dtype)


def _all_finite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """Whether every element of every tensor is finite, as a bool tensor on ``device``: the
    largest magnitude of each (NaN if it holds a NaN), in one fused call."""
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    peaks = torch._foreach_norm(tensors, float("inf"))
    if len({(t.dtype, t.device) for t in peaks}) > 1:
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in peaks})
        peaks = [t.to(device, dtype) for t in peaks]
    return torch.stack(list(peaks)).to(device).isfinite().all()


class SharpnessAware(Optimizer):
    """Sharpness-aware wrapper around ``base_optimizer`` (SAM, SAGM/ASGA or GSAM update).

    The wrapper shares ``param_groups``, ``state`` and ``defaults`` with ``base_optimizer``, so
    LR schedulers and ``zero_grad`` work on either. A param group with ``"perturb": False`` (e.g.
    the architecture logits of a supernet) is not moved by the perturbation and does not count in
    ``||g||``, but it is updated with the combined direction like the other groups.

    Args:
        base_optimizer: the optimizer that applies the update (SGD, Adam, ...).
        rho0: radius of the first step (of every step when ``adaptive=False``).
        rho_max, rho_min: bounds of the adaptive radius.
        gamma: gradient-alignment coefficient: ``e = (rho / ||g|| - gamma) * g``.
        adaptive: radius of the next step from the surrogate gap, ``clamp(ln(1 + h), ...)``.
        h_ema: EMA factor of the gap in ``[0, 1)``; 0 uses the gap of the previous step alone.
        update: ``"mean"``, ``"adv"`` or ``"gsam"`` (see the module docstring).
        alpha: GSAM coefficient of the orthogonal component (``update="gsam"`` only).
        model: default model of :meth:`step`, :meth:`second_pass` and :meth:`first_pass_context`.
        distributed: all-reduce (average) the pass-1 gradients and the losses over the process
            group; ``None`` does it when ``torch.distributed`` is initialized.
        process_group: process group of those all-reduces (default: the world).
        eps: added to ``||g||`` before dividing.
    """

    param_groups = _delegated("param_groups")  # type: ignore[assignment]
    state = _delegated("state")  # type: ignore[assignment]
    defaults = _delegated("defaults")  # type: ignore[assignment]

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho0: float = 0.05,
        rho_max: float = 0.1,
        rho_min: float = 0.01,
        gamma: float = 0.001,
        adaptive: bool = True,
        h_ema: float = 0.0,
        update: str = "mean",
        alpha: float = 0.0,
        model: nn.Module | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        eps: float = 1e-12,
    ) -> None:
        if isinstance(base_optimizer, SharpnessAware):
            raise ConfigError(
                "base_optimizer is already a sharpness-aware wrapper; wrap the plain optimizer"
            )
        if not isinstance(base_optimizer, Optimizer):
            raise ConfigError(
                f"base_optimizer must be a torch.optim.Optimizer, got "
                f"{type(base_optimizer).__name__}; pass e.g. torch.optim.SGD(params, lr=0.1)"
            )
        self.rho0 = _check_number("rho0", rho0, 0.0)
        self.rho_min = _check_number("rho_min", rho_min, 0.0)
        self.rho_max = _check_number("rho_max", rho_max, 0.0)
        if self.rho_min > self.rho_max:
            raise ConfigError(
                f"rho_min={self.rho_min} is larger than rho_max={self.rho_max}; "
                "pass rho_min <= rho_max"
            )
        self.gamma = _check_number("gamma", gamma, 0.0)
        self.h_ema = _check_number("h_ema", h_ema, 0.0, 1.0)
        self.alpha = _check_number("alpha", alpha, 0.0)
        self.eps = _check_number("eps", eps, 0.0)
        if update not in UPDATES:
            raise ConfigError(f"update must be one of {UPDATES}, got {update!r}")
        if self.alpha != 0.0 and update != "gsam":
            raise ConfigError(f"alpha is used only with update='gsam', got update={update!r}")
        if not isinstance(adaptive, bool):
            raise ConfigError(f"adaptive must be True or False, got {adaptive!r}")
        if distributed is not None and not isinstance(distributed, bool):
            raise ConfigError(f"distributed must be True, False or None, got {distributed!r}")
        for group in base_optimizer.param_groups:
            self._check_group(group)
        self.adaptive = adaptive
        self.update = update
        self.model = model
        self.distributed = distributed
        self.process_group = process_group

        self.base_optimizer = base_optimizer
        self._ready = False
        params = [p for group in base_optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})
        self._ready = True
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_init_{name}", None)

        self.rho = self.rho0
        self.stats: dict[str, float] = {}
        self._h_smooth: float | None = None
        self._steps = 0
        self._skipped_steps = 0
        self._clear_pass()

    # ------------------------------------------------------------------ housekeeping

    @staticmethod
    def _check_group(group: Mapping[str, Any]) -> None:
        if not isinstance(group.get("perturb", True), bool):
            raise ConfigError(
                f"param group key 'perturb' must be True or False, got {group['perturb']!r}"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (may carry ``"perturb": False``)."""
        if not self.__dict__.get("_ready", False):
            super().add_param_group(param_group)
            return
        if self._pending:
            raise ConfigError("add_param_group() called between first_step() and second_step()")
        self._check_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho:.4g}, rho0={self.rho0}, rho_min={self.rho_min}, "
            f"rho_max={self.rho_max}, gamma={self.gamma}, adaptive={self.adaptive}, "
            f"h_ema={self.h_ema}, update={self.update!r}, alpha={self.alpha}, "
            f"base={self.base_optimizer!r})"
        )

    def _clear_pass(self) -> None:
        self._pending = False
        self._entries: list[tuple[Tensor, bool]] = []
        self._g: dict[Tensor, Tensor] = {}
        self._theta: dict[Tensor, Tensor] = {}
        self._loss: Tensor | float = 0.0
        self._grad_norm = 0.0
        self._rho_used = self.rho
        self._scale = 1.0

    def _iter_params(self) -> Iterator[tuple[Tensor, bool]]:
        for group in self.param_groups:
            perturb = group.get("perturb", True)
            for p in group["params"]:
                if p.requires_grad:
                    yield p, perturb

    def _dist_active(self) -> bool:
        ready = dist.is_available() and dist.is_initialized()
        if self.distributed is True and not ready:
            raise ConfigError(
                "distributed=True but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() first or pass distributed=None"
            )
        return ready and self.distributed is not False

    def _world(self) -> int:
        return dist.get_world_size(self.process_group)

    @staticmethod
    def _scale_of(scaler: GradScalerLike | None) -> float:
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        scale = float(scaler.get_scale())
        if not math.isfinite(scale) or scale <= 0.0:
            raise ConfigError(f"the GradScaler scale is {scale}; pass a working GradScaler")
        return scale

    def _require_pending(self, what: str) -> None:
        if not self._pending:
            raise ConfigError(
                f"{what} called without first_step(); call opt.first_step(loss) after the "
                "backward pass of the unperturbed loss"
            )

    # ------------------------------------------------------------------ contexts

    def first_pass_context(self, model: nn.Module | None = None) -> AbstractContextManager[Any]:
        """``model.no_sync()`` for a DDP model when this wrapper all-reduces pass 1 itself."""
        model = model if model is not None else self.model
        if isinstance(model, DistributedDataParallel) and self._dist_active():
            return model.no_sync()
        return nullcontext()

    def second_pass(self, model: nn.Module | None = None) -> AbstractContextManager[Any]:
        """Context of the perturbed forward-backward: running statistics of ``model`` frozen."""
        self._require_pending("second_pass()")
        model = model if model is not None else self.model
        if model is None:
            raise ConfigError(
                "second_pass() needs the model to freeze its BatchNorm statistics; "
                "call opt.second_pass(model) or build the optimizer with model=model"
            )
        return frozen_bn_stats(model)

    # ------------------------------------------------------------------ the two steps

    def _collect_grads(self, entries: list[tuple[Tensor, bool]]) -> dict[Tensor, Tensor]:
        """Copy of the pass-1 gradients, averaged over ranks when distributed."""
        for p, _ in entries:
            if p.grad is not None and p.grad.is_sparse:
                raise ConfigError(
                    "sparse gradients are not supported by sharpness-aware optimizers; "
                    "build the embedding with sparse=False"
                )
        if not self._dist_active() or self._world() == 1:
            have = [p for p, _ in entries if p.grad is not None]
            # copies (x * 1.0 is exact, -0.0 and NaN included), one fused call for all
            return dict(zip(have, torch._foreach_mul([p.grad.detach() for p in have], 1.0),
                            strict=True))
        if not entries:
            return {}
        device = entries[0][0].device
        has = torch.tensor(
            [float(p.grad is not None) for p, _ in entries], device=device, dtype=torch.float32
        )
        dist.all_reduce(has, group=self.process_group)
        used = [p for (p, _), flag in zip(entries, has.tolist(), strict=True) if flag > 0]
        grads = {
            p: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in used
        }
        buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
        for p in used:
            g = grads[p]
            chunks = buckets.setdefault((g.device, g.dtype), [[]])
            if chunks[-1] and sum(t.numel() for t in chunks[-1]) + g.numel() > _BUCKET_NUMEL:
                chunks.append([])
            chunks[-1].append(g)
        world = float(self._world())
        for chunks in buckets.values():
            for chunk in chunks:
                flat = torch.cat([t.reshape(-1) for t in chunk])
                dist.all_reduce(flat, group=self.process_group)
                flat.div_(world)
                offset = 0
                for t in chunk:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        return grads

    @torch.no_grad()
    def first_step(self, loss: Tensor | float, scaler: GradScalerLike | None = None) -> None:
        """Store ``g``, move the perturbed params to ``theta + e`` and set all grads to None.

        ``loss`` is the unperturbed (unscaled) loss of pass 1. With AMP pass the ``GradScaler``
        whose ``scale(loss).backward()`` made the grads; they are unscaled here. If ``||g||`` is
        not finite the params are not moved and :meth:`second_step` skips the update.
        """
        if self._pending:
            raise ConfigError(
                "first_step() called twice; call second_step(loss_adv) to finish the step "
                "(or cancel_step() to abandon it)"
            )
        loss_value = _scalar(loss, "loss")
        scale = self._scale_of(scaler)
        for group in self.param_groups:
            self._check_group(group)
        entries = list(self._iter_params())
        if not entries:
            raise ConfigError(
                "no parameter of the optimizer requires grad; give the base optimizer trainable "
                "parameters"
            )
        grads = self._collect_grads(entries)
        if scale != 1.0 and grads:
            torch._foreach_div_(list(grads.values()), scale)
        perturbed = [p for p, perturb in entries if perturb and p in grads]
        if perturbed:
            norm_sq = _sum_dots([grads[p] for p in perturbed], None, entries[0][0].device,
                                _stat_dtype(entries))
            grad_norm = float(norm_sq.sqrt())
        else:
            grad_norm = 0.0
        rho = self.rho
        theta: dict[Tensor, Tensor] = {}
        if math.isfinite(grad_norm):
            coef = rho / (grad_norm + self.eps) - self.gamma
            if coef != 0.0 and perturbed:
                params = [p.detach() for p in perturbed]
                theta = dict(zip(perturbed, torch._foreach_mul(params, 1.0), strict=True))
                torch._foreach_add_(params, [grads[p].to(p.dtype) for p in perturbed],
                                    alpha=coef)
        for p, _ in entries:
            p.grad = None
        self._entries = entries
        self._g = grads
        self._theta = theta
        self._loss = loss_value
        self._grad_norm = grad_norm
        self._rho_used = rho
        self._scale = scale
        self._pending = True

    @torch.no_grad()
    def cancel_step(self) -> None:
        """Abandon a step begun by :meth:`first_step`: restore ``theta`` exactly, no update."""
        self._restore()
        self._clear_pass()

    def _restore(self) -> None:
        """The perturbed params back to ``theta`` (exact copies)."""
        if self._theta:
            torch._foreach_copy_([p.detach() for p in self._theta],
                                 list(self._theta.values()))

    @torch.no_grad()
    def second_step(
        self,
        loss_adv: Tensor | float,
        before_update: Callable[[], Any] | None = None,
        scaler: GradScalerLike | None = None,
    ) -> dict[str, float]:
        """Restore ``theta``, set the grads to the update direction and run the base step.

        ``loss_adv`` is the (unscaled) loss of pass 2 at ``theta + e``. ``before_update()``, if
        given, runs with grad enabled after the grads hold the update direction (in unscaled
        units) and before the base step: add extra gradients there once (e.g.
        ``(lam * complexity(alpha)).backward()``) or clip. With a ``GradScaler`` the step goes
        through ``scaler.step(base_optimizer)``, which skips it on inf/nan; call
        ``scaler.update()`` afterwards. Without a scaler a non-finite direction skips the step.
        Returns :attr:`stats`.
        """
        self._require_pending("second_step()")
        loss_adv_value = _scalar(loss_adv, "loss_adv")
        scale = self._scale_of(scaler)
        if scale != self._scale:
            raise ConfigError(
                f"second_step() got a loss scale of {scale} but first_step() got {self._scale}; "
                "pass the same GradScaler to both and call scaler.update() after second_step()"
            )
        self._restore()
        entries, grads = self._entries, self._g
        device = entries[0][0].device
        stat_dtype = _stat_dtype(entries)
        self._unscale_adv(entries, scale)
        dot_p_t, adv2_p_t = self._adv_grad_dots(entries, grads, stat_dtype, perturbed_only=True)
        self._combine(entries, grads, stat_dtype)
        if before_update is not None:
            with torch.enable_grad():
                before_update()
        all_grads = [p.grad for group in self.param_groups for p in group["params"]]
        loss_v, loss_adv_v, dot_pv, adv2_pv, finite_v = self._reduce_summary(
            all_grads, loss_adv_value, dot_p_t, adv2_p_t, device, stat_dtype
        )
        finite = finite_v > 0.5 and math.isfinite(self._grad_norm)
        self._base_step(scaler, scale, all_grads, finite)
        h = loss_adv_v - loss_v
        rho_used = self._rho_used
        self._update_rho(finite, h)
        self.stats = self._step_stats(rho_used, h, loss_v, loss_adv_v, dot_pv, adv2_pv, finite)
        self._clear_pass()
        return self.stats

    def _unscale_adv(self, entries: list[tuple[Tensor, bool]], scale: float) -> None:
        """Check that the pass-2 grads are dense and divide them by the loss scale."""
        adv = [p.grad for p, _ in entries if p.grad is not None]
        if any(ga.is_sparse for ga in adv):
            self._clear_pass()
            raise ConfigError(
                "sparse gradients are not supported by sharpness-aware optimizers; "
                "build the embedding with sparse=False"
            )
        if scale != 1.0 and adv:
            torch._foreach_div_(adv, scale)

    def _adv_grad_dots(
        self,
        entries: list[tuple[Tensor, bool]],
        grads: dict[Tensor, Tensor],
        stat_dtype: torch.dtype,
        perturbed_only: bool,
    ) -> tuple[Tensor, Tensor]:
        """``<g, g_adv>`` and ``||g_adv||^2`` over the perturbed params (or all of them)."""
        device = entries[0][0].device
        sel = [p for p, perturb in entries
               if p.grad is not None and (perturb or not perturbed_only)]
        both = [p for p in sel if p in grads]
        dot = _sum_dots([grads[p] for p in both], [p.grad for p in both], device, stat_dtype)
        adv2 = _sum_dots([p.grad for p in sel], None, device, stat_dtype)
        return dot, adv2

    def _combine(
        self,
        entries: list[tuple[Tensor, bool]],
        grads: dict[Tensor, Tensor],
        stat_dtype: torch.dtype,
    ) -> None:
        """Set the grads to the update direction of :attr:`update` (``"adv"``: left as is)."""
        if self.update == "gsam":
            dot_all_t, adv2_all_t = self._adv_grad_dots(entries, grads, stat_dtype,
                                                        perturbed_only=False)
            positive = adv2_all_t > 0
            proj = torch.where(positive, dot_all_t / torch.where(positive, adv2_all_t, 1.0), 0.0)
            self._combine_gsam(entries, grads, proj)
        elif self.update == "mean":
            self._combine_mean(entries, grads)

    def _reduce_summary(
        self,
        all_grads: list[Tensor | None],
        loss_adv_value: Tensor | float,
        dot_p_t: Tensor,
        adv2_p_t: Tensor,
        device: torch.device,
        stat_dtype: torch.dtype,
    ) -> list[float]:
        """``[loss, loss_adv, <g, g_adv>, ||g_adv||^2, finite]`` in one transfer to the host.

        The losses are averaged over ranks when distributed; ``finite`` is 1.0 when every grad
        is finite.
        """
        finite_t = _all_finite([g for g in all_grads if g is not None], device)
        losses = torch.stack(
            [_as_tensor(v, device, stat_dtype) for v in (self._loss, loss_adv_value)]
        )
        if self._dist_active() and self._world() > 1:
            dist.all_reduce(losses, group=self.process_group)
            losses = losses / self._world()
        summary = [losses, dot_p_t.reshape(1), adv2_p_t.reshape(1)]
        summary.append(finite_t.to(device, stat_dtype).reshape(1))
        return torch.cat(summary).tolist()

    def _base_step(
        self,
        scaler: GradScalerLike | None,
        scale: float,
        all_grads: list[Tensor | None],
        finite: bool,
    ) -> None:
        """The base optimizer's step: through ``scaler`` (grads rescaled), else if finite."""
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            if scale != 1.0:
                for g in all_grads:
                    if g is not None:
                        g.mul_(scale)
            scaler.step(self.base_optimizer)
        elif finite:
            self.base_optimizer.step()
        self._opt_called = True  # tells an LR scheduler attached to the wrapper that we stepped

    def _update_rho(self, finite: bool, h: float) -> None:
        """Count the step; on a finite step smooth the gap ``h`` and adapt the next radius."""
        if finite:
            self._steps += 1
            if math.isfinite(h):
                h_pos = max(h, 0.0)
                if self._h_smooth is None:
                    self._h_smooth = h_pos
                else:
                    self._h_smooth = self.h_ema * self._h_smooth + (1.0 - self.h_ema) * h_pos
                if self.adaptive:
                    self.rho = min(max(math.log1p(self._h_smooth), self.rho_min), self.rho_max)
        else:
            self._skipped_steps += 1

    def _step_stats(
        self,
        rho_used: float,
        h: float,
        loss_v: float,
        loss_adv_v: float,
        dot_pv: float,
        adv2_pv: float,
        finite: bool,
    ) -> dict[str, float]:
        g2 = self._grad_norm**2
        denom = math.sqrt(g2 * adv2_pv) if g2 * adv2_pv > 0 else 0.0
        return {
            "rho": rho_used,
            "rho_next": self.rho,
            "h": h,
            "h_smooth": self._h_smooth if self._h_smooth is not None else float("nan"),
            "loss": loss_v,
            "loss_adv": loss_adv_v,
            "grad_norm": self._grad_norm,
            "grad_adv_norm": math.sqrt(max(adv2_pv, 0.0)),
            "cos_g_gadv": dot_pv / denom if denom > 0 else 0.0,
            "skipped": float(not finite),
            "step": float(self._steps),
            "skipped_steps": float(self._skipped_steps),
        }

    @staticmethod
    def _combine_mean(entries: list[tuple[Tensor, bool]], grads: dict[Tensor, Tensor]) -> None:
        adv: list[Tensor] = []
        first: list[Tensor] = []
        for p, _ in entries:
            g = grads.get(p)
            if g is None:
                if p.grad is not None:
                    p.grad.mul_(0.5)
            elif p.grad is None:
                p.grad = g.mul_(0.5)
            else:
                adv.append(p.grad)
                first.append(g)
        if adv:  # (g_adv + g) * 0.5, fused over the params
            torch._foreach_add_(adv, first)
            torch._foreach_mul_(adv, 0.5)

    def _combine_gsam(
        self, entries: list[tuple[Tensor, bool]], grads: dict[Tensor, Tensor], proj: Tensor
    ) -> None:
        # d = g_adv - alpha * (g - proj * g_adv) = (1 + alpha * proj) * g_adv - alpha * g
        for p, _ in entries:
            g = grads.get(p)
            ga = p.grad
            if ga is not None:
                ga.mul_((1.0 + self.alpha * proj).to(ga.device, ga.dtype))
            if g is None:
                continue
            if ga is None:
                p.grad = g.mul_(-self.alpha)
            else:
                ga.add_(g, alpha=-self.alpha)

    # ------------------------------------------------------------------ closure step

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        model: nn.Module | None = None,
        scaler: GradScalerLike | None = None,
    ) -> Tensor:
        """Both passes in one call; ``closure()`` zeroes grads, runs forward+backward, returns loss.

        With AMP the closure calls ``scaler.scale(loss).backward()`` and returns ``loss``; pass
        the same ``scaler`` here and call ``scaler.update()`` afterwards. Returns the loss of
        pass 1.
        """
        if closure is None:
            raise ConfigError(
                f"{type(self).__name__}.step() needs a closure that zeroes the grads, runs "
                "forward and backward and returns the loss; or use first_step()/second_step()"
            )
        model = model if model is not None else self.model
        with torch.enable_grad(), self.first_pass_context(model):
            loss = closure()
        self.first_step(loss, scaler=scaler)
        try:
            context = frozen_bn_stats(model) if model is not None else nullcontext()
            with torch.enable_grad(), context:
                loss_adv = closure()
        except BaseException:
            self.cancel_step()
            raise
        self.second_step(loss_adv, scaler=scaler)
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Base optimizer state plus the radius, the smoothed gap and the step counters."""
        if self._pending:
            raise ConfigError(
                "state_dict() called between first_step() and second_step(); "
                "save the state after second_step()"
            )
        state = self.base_optimizer.state_dict()
        state[_STATE_KEY] = {
            "rho": self.rho,
            "h_smooth": self._h_smooth,
            "steps": self._steps,
            "skipped_steps": self._skipped_steps,
        }
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from :meth:`state_dict` (or a plain base-optimizer state dict)."""
        if self._pending:
            raise ConfigError(
                "load_state_dict() called between first_step() and second_step(); "
                "load the state before first_step()"
            )
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise CheckpointError(
                "this is not an optimizer state dict; pass the dict returned by state_dict()"
            )
        extra = state_dict.get(_STATE_KEY)
        base_state = {k: v for k, v in state_dict.items() if k != _STATE_KEY}
        try:
            self.base_optimizer.load_state_dict(base_state)
        except ValueError as exc:
            raise CheckpointError(
                f"optimizer state does not match the param groups ({exc}); load a state saved "
                "with the same model and param groups"
            ) from exc
        if extra is not None:
            try:
                self.rho = float(extra["rho"])
                h_smooth = extra["h_smooth"]
                self._h_smooth = None if h_smooth is None else float(h_smooth)
                self._steps = int(extra["steps"])
                self._skipped_steps = int(extra["skipped_steps"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"the sharpness-aware part of the optimizer state is corrupt ({exc}); "
                    "load a state saved by state_dict()"
                ) from exc


class ASGA(SharpnessAware):
    """ASGA: SAGM update ``(g + g_adv) / 2`` with ``e = (rho/||g|| - gamma) g``, adaptive rho."""


class SAM(SharpnessAware):
    """SAM (Foret et al., 2021): ``e = rho g/||g||``, update with ``g_adv``, fixed ``rho``."""

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.05,
        model: nn.Module | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        eps: float = 1e-12,
    ) -> None:
        rho = _check_number("rho", rho, 0.0)
        super().__init__(
            base_optimizer,
            rho0=rho,
            rho_min=rho,
            rho_max=rho,
            gamma=0.0,
            adaptive=False,
            update="adv",
            model=model,
            distributed=distributed,
            process_group=process_group,
            eps=eps,
        )


class GSAM(SharpnessAware):
    """GSAM (Zhuang et al., ICLR 2022): ``e = rho g/||g||``, update ``g_adv - alpha g_perp``."""

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        rho: float = 0.05,
        alpha: float = 0.1,
        model: nn.Module | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        eps: float = 1e-12,
    ) -> None:
        rho = _check_number("rho", rho, 0.0)
        super().__init__(
            base_optimizer,
            rho0=rho,
            rho_min=rho,
            rho_max=rho,
            gamma=0.0,
            adaptive=False,
            update="gsam",
            alpha=alpha,
            model=model,
            distributed=distributed,
            process_group=process_group,
            eps=eps,
        )
