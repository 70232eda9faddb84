"""HAWQ: Hessian-aware bit allocation by an integer linear program (HAWQ-V2/V3 style).

No supernet and no training search. On the full-precision model, in eval mode (BatchNorm on
its running statistics, so the images of a batch do not interact):

1. Per quantizable layer ``l``, the trace of the Hessian of the batch-mean loss with respect to
   the layer's weight, ``tr(H_W[l])``, and with respect to the layer's input activation,
   ``tr(H_X[l])``, estimated per proxy batch and averaged over the batches. The input
   activation is made a variable of its own by a forward pre-hook that feeds the layer ``x + d``
   with ``d = 0`` a leaf tensor (:class:`InputPerturbation`): derivatives w.r.t. ``d`` are those
   w.r.t. the activation, and the earlier layers stay in the graph. Estimators
   (``hawq_estimator``, :data:`ESTIMATORS`), all unbiased (``ggn`` for the Gauss-Newton
   trace), all deterministic for a seed:

   * ``ggn`` (default): per sample a random vector ``u`` over the logits with covariance
     ``H_z`` (the Hessian of the loss w.r.t. the logits) and ONE backward pass ``J^T u`` for
     all blocks at once; ``||(J^T u)_b||^2`` estimates ``tr(J_b^T H_z J_b)``, the Gauss-Newton
     block, which equals the Hessian block ``H_bb`` wherever the logits are piecewise linear in
     that block (ReLU/ReLU6, BatchNorm in eval mode, pooling, residual sums, linear layers:
     the ResNets and MobileNetV2 here); for other networks it is the positive semi-definite
     Gauss-Newton part of the Hessian. No cross-block terms, so little variance, and a plain
     backward instead of a double one (:func:`gauss_newton_trace`). On ResNet-20 (bundled
     weights, 32 images) a sample costs a quarter of a ``joint`` one, and its relative
     standard deviation is 0.4 for the weight blocks and 0.1 for the activation blocks
     against 1.5 and 4.3 with ``joint``: at 4 x 32 images x 16 samples the ``ggn`` policy
     terms are within a few percent of an 8x larger run, the ``joint`` activation terms off
     by 130% (median) at four times the cost.
   * ``joint``: Hutchinson, ``tr(H_bb) = E[v_b . (Hv)_b]`` with ONE Hessian-vector product
     (double backward through the whole graph) per Rademacher vector ``v`` over all blocks;
     the cross-block terms are zero in expectation but dominate the variance of the
     activation blocks (:func:`hutchinson_trace`).
   * ``per_block``: Hutchinson with one Hessian-vector product per block per sample.

2. Sensitivity of each bit choice, the second-order estimate of the loss increase (factor 1/2
   dropped from both terms, it does not change the argmin):

       Omega_w(l, b) = tr(H_W[l]) / numel(W[l]) * ||Q_b(W[l]) - W[l]||^2
       Omega_a(l, b) = tr(H_X[l]) / d[l] * mean_i ||Q_b(x_i[l]) - x_i[l]||^2

   where ``Q_b`` is the MSE-optimal uniform ``b``-bit quantizer of :mod:`mpqkit.quant` (weights
   signed symmetric, per tensor or per channel as configured; activations per tensor, unsigned
   when non-negative), ``d[l]`` the activation size of one image and ``x_i[l]`` the layer's input
   for image ``i`` of a calibration batch (the first proxy batch).

   Both terms estimate the same quantity, twice the change of the batch-mean loss ``L = 1/B
   sum_i l_i`` under the perturbation, with the Hessian replaced by ``tr(H)/n`` times the
   identity over its ``n`` variables. Weights: ``dL ~ 1/2 dW^T H_W dW ~ 1/2 tr(H_W)/numel(W)
   ||dW||^2``. Activations: ``H_X``, the Hessian w.r.t. the whole ``B x d`` batch tensor, is
   block diagonal with blocks ``h_i / B`` (``h_i`` the Hessian of ``l_i`` w.r.t. ``x_i``), so
   ``tr(H_X) = mean_i tr(h_i)``, the trace of ONE image's loss; perturbing every image,
   ``dL ~ 1/2 sum_i dx_i^T h_i dx_i / B ~ 1/2 tr(H_X)/(B d) sum_i ||dx_i||^2 = 1/2 tr(H_X)/d
   mean_i ||dx_i||^2``. The batch size cancels (the 1/B of the mean in the Hessian against the
   B perturbed images): no factor is missing. Checked on ResNet-20 (bundled weights, one layer
   at a time at 2 bits, ``tests/search/test_hawq.py``): the measured loss increase is 2-4x
   the second-order estimate for weights and activations alike, and the predictions rank
   the 40 weight and activation perturbations like the measured increases (Spearman about
   0.9). The w3a3 policy has mostly 4-bit weights and 2-bit activations because 2-bit
   weights (3 levels) hurt far more than 2-bit activations (4 levels after a ReLU) and a
   w4a2 layer costs fewer BitOps than a w3a3 one; without fine-tuning it has a test loss of
   0.79 (75% top-1) against 1.16 (63%) for uniform w3a3, and scaling the activation terms
   by 4 or 32 makes it worse (1.01 and 3.58).
3. An integer linear program picks one ``(w_bits, a_bits)`` per searchable layer minimising
   ``sum_l Omega_w(l, w) + Omega_a(l, a)`` under the budget, with the band
   ``[(1 - tol) * budget, budget]`` as constraint (``scipy.optimize.milp``).

With ``activations=False`` no activation trace is measured and the stated simpler rule applies:
the activation bits of a layer equal its weight bits (only choices with ``a == w``).

The traces are cached as ``hawq_traces.json`` in the run folder and reused when the model,
data, batches, iterations, estimator and seed are the same; ``hawq_sensitivity.json`` keeps the
traces and every Omega for inspection.

As ``mpqkit search --method hawq`` (registered here): the FP model is the one given by
``--weights`` (or ``bundled``); without weights, the ``teacher`` checkpoint if given, else the
model trained on the proxy set for ``teacher_epochs`` epochs into ``RUN_DIR/fp`` (a Hessian of
random weights says nothing). ``hawq_batches`` proxy batches of ``hawq_batch_size`` images
(default 4 x 32) and ``hawq_iters`` samples per batch (16); a progress bar on a terminal and a
log line per batch. ResNet-20 on CIFAR-10 with the bundled weights takes about 6 s of traces
on one core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from mpqkit.complexity import Budget, LayerInfo, layer_cost, policy_cost
from mpqkit.errors import BudgetError, ConfigError, check_choice
from mpqkit.quant.layers import QuantMixin, quantizable_layers
from mpqkit.quant.quantizers import make_act_quantizer, make_weight_quantizer
from mpqkit.search.budget import DEFAULT_TOL, check_feasible, solve_choices
from mpqkit.search.context import MethodResult, SearchContext
from mpqkit.search.methods._teacher import TeacherOptions, proxy_fp_model
from mpqkit.search.registry import register_method

CACHE_FILE = "hawq_traces.json"
log = logging.getLogger("mpqkit")
#: Trace estimators: ``ggn`` (:func:`gauss_newton_trace`: one backward per sample for all
#: blocks), ``joint`` (:func:`hutchinson_trace`: one Hessian-vector product per sample for all
#: blocks), ``per_block`` (one Hessian-vector product per block per sample).
ESTIMATORS = ("ggn", "joint", "per_block")
LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Hutchinson
# ----------------------------------------------------------------------------------------------
def _rademacher(shape: torch.Size, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).float().mul_(2).sub_(1)


def hutchinson_trace(fn: Callable[[], tuple[Tensor, Sequence[Tensor]]], iters: int = 16,
                     seed: int = 0, joint: bool = True,
                     on_sample: Callable[[], None] | None = None) -> list[float]:
    """Hutchinson estimates of the trace of each diagonal Hessian block.

    ``fn()`` returns a scalar loss and the tensors ``t_b`` whose blocks ``d^2 loss / d t_b^2``
    are wanted. One gradient with ``create_graph=True``, then per sample a Rademacher vector
    per block (generator seeded with ``seed``) and Hessian-vector products by double backward:

    * ``joint=True`` (default): ONE product ``Hv`` for the joint vector ``v`` over all blocks,
      and ``v_b . (Hv)_b`` as block ``b``'s sample. Unbiased: ``E[v_b . (Hv)_b] = tr(H_bb) +
      sum_{c != b} E[v_b^T H_bc v_c] = tr(H_bb)``, the ``v_c`` being independent of ``v_b`` with
      mean 0; the cross terms add ``||H_b,rest||_F^2`` to the variance of a sample
      (``2 sum_{i != j} H_ij^2`` inside the block). The tensors must be independent variables
      (leaves: parameters, or the zero perturbations of :class:`InputPerturbation`), not
      intermediates of one another.
    * ``joint=False``: one product per block (the exact block; as many products as blocks).

    Blocks the loss does not depend on twice give 0. ``on_sample()`` is called after each sample.
    """
    if iters < 1:
        raise ConfigError(f"Hutchinson iterations must be >= 1, got {iters}: e.g. 16")
    with torch.enable_grad():
        loss, tensors = fn()
        tensors = list(tensors)
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        sums = [0.0] * len(tensors)
        gen = torch.Generator().manual_seed(int(seed))
        for it in range(iters):
            vs = [_rademacher(tensors[i].shape, gen).to(tensors[i]) for i in live]
            last = it + 1 == iters
            if joint and live:
                hvs = torch.autograd.grad([grads[i] for i in live], [tensors[i] for i in live],
                                          grad_outputs=vs, retain_graph=not last,
                                          allow_unused=True)
            else:
                hvs = tuple(torch.autograd.grad(grads[i], tensors[i], grad_outputs=v,
                                                retain_graph=not (last and j + 1 == len(live)),
                                                allow_unused=True)[0]
                            for j, (i, v) in enumerate(zip(live, vs, strict=True)))
            for i, v, hv in zip(live, vs, hvs, strict=True):
                if hv is not None:
                    sums[i] += float((hv * v).sum())
            if on_sample is not None:
                on_sample()
    return [s / iters for s in sums]


def gauss_newton_trace(logits: Tensor, tensors: Sequence[Tensor], iters: int = 16,
                       seed: int = 0,
                       on_sample: Callable[[], None] | None = None) -> list[float]:
    """Traces of the Gauss-Newton blocks ``J_b^T H_z J_b`` of the batch-mean cross-entropy.

    ``logits`` (``B x C``, with its graph) and the tensors ``t_b`` it depends on (``J_b = d
    logits / d t_b``); ``H_z`` is the Hessian of the batch-mean cross-entropy w.r.t. the logits,
    ``(diag(p_i) - p_i p_i^T) / B`` for image ``i``, ``S S^T`` with ``S_i = (diag(sqrt p_i) -
    p_i sqrt(p_i)^T) / sqrt(B)``. Per sample a Rademacher ``r`` over the logits and ONE backward
    pass ``g = J^T S r`` give ``||g_b||^2`` for every block, whose mean is ``tr(J_b^T S S^T
    J_b)``: unbiased, no cross-block terms, never negative, and a plain backward instead of a
    double one. Where the logits are piecewise linear in each block (ReLU/ReLU6, BatchNorm in
    eval mode, pooling, residual sums, linear layers: ResNets, MobileNetV2) a diagonal block
    of the Hessian equals its Gauss-Newton block, so this is ``tr(H_bb)``; otherwise it is the
    Gauss-Newton (positive semi-definite) part of it.
    """
    if iters < 1:
        raise ConfigError(f"Hutchinson iterations must be >= 1, got {iters}: e.g. 16")
    if logits.dim() != 2:
        raise ConfigError(f"the Gauss-Newton estimator needs class logits (batch x classes), got "
                          f"shape {tuple(logits.shape)}: use hawq_estimator=joint")
    tensors = list(tensors)
    with torch.no_grad():
        p = logits.detach().float().softmax(1)
        sp = p.sqrt()
    sums = [0.0] * len(tensors)
    gen = torch.Generator().manual_seed(int(seed))
    for it in range(iters):
        r = _rademacher(logits.shape, gen).to(p)
        u = (sp * r - p * (sp * r).sum(1, keepdim=True)) / math.sqrt(logits.shape[0])
        gs = torch.autograd.grad(logits, tensors, grad_outputs=u.to(logits.dtype),
                                 retain_graph=it + 1 < iters, allow_unused=True)
        for i, g in enumerate(gs):
            if g is not None:
                sums[i] += float(g.float().pow(2).sum())
        if on_sample is not None:
            on_sample()
    return [s / iters for s in sums]


class InputPerturbation:
    """Forward pre-hooks that feed each named layer ``x + d`` with ``d = 0`` a leaf tensor.

    ``d/dd`` of the loss is the derivative with respect to the layer's input activation, and
    Hessian-vector products with respect to ``d`` are those of the activation, while the path
    from earlier layers through the activation stays in the graph (a joint product over the
    weights and the activations of all layers needs both: detaching the input would cut the
    earlier layers off). ``deltas`` maps the layers seen in the last forward, in call order, to
    their ``d`` (a layer called twice in one forward: its first call is perturbed). Use as a
    context manager; :meth:`reset` before each forward.
    """

    def __init__(self, mods: Mapping[str, nn.Module], names: Sequence[str]) -> None:
        self.mods = {n: mods[n] for n in names}
        self.deltas: dict[str, Tensor] = {}
        self._hooks: list[Any] = []

    def _hook(self, name: str) -> Callable[..., Any]:
        def fn(mod: nn.Module, inp: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            if name in self.deltas:
                return None
            d = torch.zeros_like(inp[0], requires_grad=True)
            self.deltas[name] = d
            return (inp[0] + d, *inp[1:])

        return fn

    def reset(self) -> None:
        self.deltas = {}

    def __enter__(self) -> InputPerturbation:
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.mods.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.reset()


@dataclass
class LayerTraces:
    """Hessian traces per layer: w.r.t. the weight and w.r.t. the input activation (batch)."""

    weight: dict[str, float]
    act: dict[str, float]
    weight_numel: dict[str, int]
    act_numel: dict[str, int]  # elements of one image's input activation
    batches: int = 0
    iters: int = 0
    seed: int = 0
    images: int = 0
    hvps: int = 0  # Hessian- (or Gauss-Newton-) vector products computed
    passes: int = 0  # forward/backward-equivalent passes
    seconds: float = 0.0
    key: str = ""
    estimator: str = "joint"  # see ESTIMATORS
    fallback: str = ""  # why another estimator than the one asked for ran (empty: none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTraces:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _as_xy(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError("HAWQ needs labelled batches (inputs, targets): pass the proxy loader's "
                      "batches")


def _check_estimator(estimator: str, loss_fn: LossFn) -> None:
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "ggn" and loss_fn is not F.cross_entropy:
        raise ConfigError("the ggn trace estimator is written for the cross-entropy loss: use "
                          "estimator joint or per_block with another loss")


def _fp_layers(model: nn.Module, layers: Sequence[str] | None) -> tuple[dict[str, nn.Module],
                                                                        list[str]]:
    """The quantizable layers of a float model and the checked names of those measured."""
    mods = quantizable_layers(model)
    if any(isinstance(m, QuantMixin) for m in mods.values()):
        raise ConfigError("HAWQ measures the full-precision model: pass the float model (e.g. "
                          "mpqkit.quant.dequantize_model(model))")
    names = list(layers) if layers is not None else list(mods)
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise ConfigError(f"layers {', '.join(unknown[:8])} are not quantizable layers of the "
                          "model: use the names from `mpqkit info`")
    return mods, names


def _batch_traces(model: nn.Module, x: Tensor, y: Tensor, weights: list[Tensor],
                  pert: InputPerturbation, loss_fn: LossFn, iters: int, seed: int,
                  estimator: str, on_sample: Callable[[], None] | None
                  ) -> tuple[list[float], dict[str, float], dict[str, int]]:
    """One batch's weight traces (in ``weights`` order) and activation traces and sizes."""
    pert.reset()
    if estimator == "ggn":
        with torch.enable_grad():
            logits = model(x)
            tr = gauss_newton_trace(logits, [*weights, *pert.deltas.values()], iters, seed,
                                    on_sample)
    else:
        def closure() -> tuple[Tensor, list[Tensor]]:
            loss = loss_fn(model(x), y)
            return loss, [*weights, *pert.deltas.values()]

        tr = hutchinson_trace(closure, iters, seed, estimator == "joint", on_sample)
    ran = list(pert.deltas)  # layers whose input was seen (a layer may not run)
    act = {n: tr[len(weights) + i] for i, n in enumerate(ran)}
    return tr[: len(weights)], act, {n: int(pert.deltas[n][0].numel()) for n in ran}


def layer_traces(model: nn.Module, batches: Iterable[Any], layers: Sequence[str] | None = None,
                 *, loss_fn: LossFn = F.cross_entropy, iters: int = 16, seed: int = 0,
                 activations: bool = True, estimator: str = "ggn",
                 device: torch.device | str | None = None, progress: bool = False) -> LayerTraces:
    """Per-layer trace estimates of the loss Hessian, averaged over ``batches``.

    ``layers``: names of quantizable layers (default: all). The model must be full precision
    (quantizers are not twice differentiable); it runs in eval mode (BatchNorm on its running
    statistics), its mode and parameters' ``requires_grad`` are restored. Batch ``k`` uses the
    seed ``seed + k``: the result is a function of the model, the batches and the seed.
    ``estimator``: one of :data:`ESTIMATORS`. ``progress``: a bar on stderr when it is a
    terminal; one log line per batch either way. A model with an op that PyTorch cannot
    differentiate twice (``hardsigmoid`` of MobileNet-V3, ...) gets the ``ggn`` estimator
    instead of ``joint``/``per_block`` (first derivatives only), with a warning naming the op;
    ``LayerTraces.fallback`` records it.
    """
    _check_estimator(estimator, loss_fn)
    _fp_layers(model, layers)
    batches = list(batches)
    if not batches:
        raise ConfigError("HAWQ got no batches: give at least one proxy batch")
    kw = dict(loss_fn=loss_fn, iters=iters, seed=seed, activations=activations, device=device,
              progress=progress)
    try:
        return _layer_traces(model, batches, layers, estimator=estimator, **kw)
    except RuntimeError as exc:
        op = _not_twice_differentiable(exc)
        if estimator == "ggn" or op is None:
            raise
        if loss_fn is not F.cross_entropy:
            raise ConfigError(f"the {estimator} trace estimator needs second derivatives, which "
                              f"PyTorch lacks for {op} in this model: use the cross-entropy loss "
                              "and estimator ggn (first derivatives only)") from None
    reason = (f"PyTorch has no second derivative of {op} (in this model), which the {estimator} "
              "estimator needs")
    log.warning(f"hawq: {reason}: using the ggn estimator (Gauss-Newton traces, first "
                "derivatives only) instead")
    out = _layer_traces(model, batches, layers, estimator="ggn", **kw)
    out.fallback = f"{estimator} -> ggn: {reason}"
    return out


def _not_twice_differentiable(exc: RuntimeError) -> str | None:
    """The op named by PyTorch's "derivative for aten::X is not implemented", else None."""
    m = re.search(r"derivative for (\S+) is not implemented", str(exc))
    return m.group(1) if m else None


def _layer_traces(model: nn.Module, batches: list[Any], layers: Sequence[str] | None, *,
                  loss_fn: LossFn, iters: int, seed: int, activations: bool, estimator: str,
                  device: torch.device | str | None, progress: bool) -> LayerTraces:
    mods, names = _fp_layers(model, layers)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    weights = [mods[n].weight for n in names]
    was_training, req = model.training, [p.requires_grad for p in weights]
    out = LayerTraces(dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0),
                      {n: int(mods[n].weight.numel()) for n in names}, dict.fromkeys(names, 0),
                      batches=len(batches), iters=iters, seed=seed, estimator=estimator)
    t0 = time.time()
    bar = tqdm(total=len(batches) * iters, desc="hawq traces", leave=False, file=sys.stderr,
               disable=not progress or None, dynamic_ncols=True)
    model.eval()
    for p in weights:
        p.requires_grad_(True)
    try:
        with InputPerturbation(mods, names if activations else []) as pert:
            for k, batch in enumerate(batches):
                x, y = (t.to(dev) for t in _as_xy(batch))
                tw, ta, numel = _batch_traces(model, x, y, weights, pert, loss_fn, iters,
                                              seed + k, estimator, bar.update)
                _accumulate(out, names, tw, ta, numel, int(x.shape[0]))
                log.info(f"hawq: trace batch {k + 1}/{len(batches)} ({estimator}): "
                         f"{out.images} images, {out.hvps} products, {time.time() - t0:.1f}s")
    finally:
        bar.close()
        for p, r in zip(weights, req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    out.weight = {n: v / len(batches) for n, v in out.weight.items()}
    out.act = {n: v / len(batches) for n, v in out.act.items()}
    out.seconds = round(time.time() - t0, 3)
    return out


def _accumulate(out: LayerTraces, names: Sequence[str], tw: Sequence[float],
                ta: Mapping[str, float], numel: Mapping[str, int], images: int) -> None:
    """Add one batch's traces and its counts (images, products, passes) to ``out``."""
    for n, t in zip(names, tw, strict=True):
        out.weight[n] += t
    for n, t in ta.items():
        out.act[n] += t
    out.act_numel.update(numel)
    products = out.iters * (len(names) + len(ta) if out.estimator == "per_block" else 1)
    out.hvps += products
    # ggn: a forward, one backward per product; Hutchinson: forward and backward with graph,
    # then two passes per Hessian-vector product
    out.passes += 1 + products if out.estimator == "ggn" else 2 + 2 * products
    out.images += images


# ----------------------------------------------------------------------------------------------
# sensitivities and the integer program
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def weight_perturbation(weight: Tensor, bits: int, per_channel: bool = False) -> float:
    """``||Q_b(W) - W||^2`` for the MSE-optimal symmetric ``bits``-bit quantizer."""
    q = make_weight_quantizer("lsq", bits, weight.shape[0], per_channel).to(weight.device)
    q.init_from(weight)
    return float((q(weight.detach()) - weight).pow(2).sum())


@torch.no_grad()
def act_perturbation(x: Tensor, bits: int) -> float:
    """Mean over images of ``||Q_b(x_i) - x_i||^2`` for the MSE-optimal ``bits``-bit quantizer."""
    q = make_act_quantizer("lsq", bits).to(x.device)
    q.init_from(x.flatten(1))
    return float((q(x) - x).pow(2).sum()) / max(1, x.shape[0])


@torch.no_grad()
def capture_inputs(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """The input activation of each named layer for one batch (eval mode)."""
    mods = quantizable_layers(model)
    seen: dict[str, Tensor] = {}
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, inp, n=n: seen.__setitem__(n, inp[0].detach().clone())) for n in layers]
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


@dataclass
class Sensitivity:
    """``Omega_w[layer][bits]`` and ``Omega_a[layer][bits]`` (loss increase estimates)."""

    weight: dict[str, dict[int, float]] = field(default_factory=dict)
    act: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"weight": {n: {str(b): v for b, v in d.items()} for n, d in self.weight.items()},
                "act": {n: {str(b): v for b, v in d.items()} for n, d in self.act.items()}}


def sensitivities(model: nn.Module, traces: LayerTraces, calib_x: Tensor | None,
                  w_cands: Sequence[int], a_cands: Sequence[int], layers: Sequence[str],
                  per_channel: bool = False) -> Sensitivity:
    """Omega of every candidate bit-width of every layer (see the module docstring).

    Without ``calib_x`` (or without activation traces) the activation term is 0; then
    :func:`hawq_allocate` should be called with ``tie_bits=True``.
    """
    mods = quantizable_layers(model)
    acts = capture_inputs(model, calib_x, layers) if calib_x is not None else {}
    out = Sensitivity()
    for n in layers:
        w = mods[n].weight.detach()
        mw = traces.weight[n] / max(1, traces.weight_numel[n])
        out.weight[n] = {b: mw * weight_perturbation(w, b, per_channel) for b in w_cands}
        d = traces.act_numel.get(n, 0)
        if n in acts and d > 0:
            ma = traces.act[n] / d
            out.act[n] = {b: ma * act_perturbation(acts[n], b) for b in a_cands}
        else:
            out.act[n] = dict.fromkeys(a_cands, 0.0)
    return out


def solve_allocation(scores: Mapping[str, Mapping[tuple[int, int], float]],
                     costs: Mapping[str, Mapping[tuple[int, int], float]],
                     lo: float, hi: float) -> dict[str, tuple[int, int]] | None:
    """One ``(w, a)`` per layer minimising the summed score with ``lo <= summed cost <= hi``.

    ``scores[layer][(w, a)]`` and ``costs[layer][(w, a)]`` over the same choices. Exact
    (``scipy.optimize.milp``); None when the band cannot be met.
    """
    names = list(scores)
    choices = {n: list(scores[n]) for n in names}
    pick = solve_choices([[costs[n][c] for c in choices[n]] for n in names],
                         [[scores[n][c] for c in choices[n]] for n in names], lo, hi)
    if pick is None:
        return None
    return {n: choices[n][k] for n, k in zip(names, pick, strict=True)}


def hawq_allocate(sens: Sensitivity, infos: Mapping[str, LayerInfo], budget: Budget,
                  searchable: Sequence[str], fixed_bits: Mapping[str, tuple[int, int]],
                  w_cands: Sequence[int], a_cands: Sequence[int],
                  tol: float = DEFAULT_TOL, tie_bits: bool = False) -> dict[str, tuple[int, int]]:
    """The ILP policy (all layers, fixed ones at their bits) inside ``[(1-tol)B, B]``.

    ``tie_bits``: only ``w_bits == a_bits`` choices (the rule when no activation sensitivity
    was measured: activation bits follow the weight bits).
    """
    check_feasible(budget, infos, searchable, fixed_bits, w_cands, a_cands, tol)
    fixed_cost = sum(layer_cost(infos[n], *fixed_bits[n], budget.kind)
                     for n in infos if n not in set(searchable))
    choices = [(w, a) for w in sorted(set(w_cands)) for a in sorted(set(a_cands))
               if a == w or not tie_bits]
    if not choices:
        raise ConfigError("without activation sensitivities the weight and activation bits are "
                          "tied, but the candidate sets share no bit-width: give common "
                          "candidates or measure activations")
    scores = {n: {(w, a): sens.weight[n][w] + sens.act[n][a] for w, a in choices}
              for n in searchable}
    costs = {n: {(w, a): layer_cost(infos[n], w, a, budget.kind) for w, a in choices}
             for n in searchable}
    pick = solve_allocation(scores, costs, (1 - tol) * budget.value - fixed_cost,
                            budget.value - fixed_cost)
    if pick is None:
        raise BudgetError(f"the HAWQ integer program found no policy within {tol:.0%} under "
                          f"{budget.describe()}: choose another budget or more bit candidates")
    bits = {n: (tuple(fixed_bits[n]) if n not in pick else pick[n]) for n in infos}
    cost = policy_cost(infos, bits, budget.kind)  # type: ignore[arg-type]
    if not (1 - tol) * budget.value <= cost <= budget.value:
        raise BudgetError(f"the HAWQ policy costs {budget.format(cost)}, outside the band under "
                          f"{budget.describe()}: report this with the model and budget")
    return bits  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# the whole method
# ----------------------------------------------------------------------------------------------
@dataclass
class HawqResult:
    """What :func:`hawq_search` found, with the numbers for the policy's provenance."""

    bits: dict[str, tuple[int, int]]
    traces: LayerTraces
    sensitivity: Sensitivity
    cached: bool
    seconds: float
    images: int
    hvps: int

    def provenance(self) -> dict[str, Any]:
        return {"hawq_trace_batches": self.traces.batches,
                "hawq_trace_iters": self.traces.iters, "hawq_traces_cached": self.cached,
                "hawq_estimator": self.traces.estimator,
                **({"hawq_estimator_fallback": self.traces.fallback}
                   if self.traces.fallback else {}),
                "images_processed": self.images, "hessian_vector_products": self.hvps,
                # forward/backward-equivalent passes of the traces (see _accumulate), plus the
                # calibration forward
                "passes": (0 if self.cached else self.traces.passes) + 1,
                "wall_time_s": round(self.seconds, 3)}


def _cache_key(model: nn.Module, layers: Sequence[str], batches: list[Any], iters: int,
               seed: int, extra: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(layers), iters, seed, extra]).encode())
    with torch.no_grad():
        for n in layers:
            w = quantizable_layers(model)[n].weight.detach().float().cpu()
            h.update(f"{n}:{float(w.sum()):.6e}:{float(w.abs().sum()):.6e}".encode())
        for b in batches:
            x, y = _as_xy(b)
            h.update(f"{tuple(x.shape)}:{float(x.float().sum()):.6e}:{int(y.sum())}".encode())
    return h.hexdigest()[:16]


def hawq_search(model: nn.Module, batches: Iterable[Any], budget: Budget,
                infos: Mapping[str, LayerInfo], searchable: Sequence[str],
                fixed_bits: Mapping[str, tuple[int, int]], w_cands: Sequence[int],
                a_cands: Sequence[int], *, iters: int = 16, seed: int = 0,
                tol: float = DEFAULT_TOL, per_channel: bool = False,
                activations: bool = True, estimator: str = "ggn",
                run_dir: str | Path | None = None, loss_fn: LossFn = F.cross_entropy,
                cache_extra: str = "", progress: bool = False) -> HawqResult:
    """Hessian traces (cached in ``run_dir``), sensitivities and the ILP, on the FP ``model``.

    ``batches``: a few labelled proxy batches (the first is also the activation calibration
    batch). Returns the bits of every layer (fixed ones at ``fixed_bits``) and what was measured.
    """
    t0 = time.time()
    check_feasible(budget, infos, searchable, fixed_bits, w_cands, a_cands, tol)
    batches = list(batches)
    if not batches:
        raise ConfigError("HAWQ got no batches: give at least one proxy batch")
    layers = list(searchable)
    key = _cache_key(model, layers, batches, iters, seed,
                     f"{activations}:{estimator}:{cache_extra}")
    cache = Path(run_dir) / CACHE_FILE if run_dir is not None else None
    traces: LayerTraces | None = None
    if cache is not None and cache.is_file():
        try:
            stored = LayerTraces.from_dict(json.loads(cache.read_text()))
            traces = stored if stored.key == key else None
        except (ValueError, TypeError, KeyError):
            traces = None
    cached = traces is not None
    if traces is None:
        traces = layer_traces(model, batches, layers, loss_fn=loss_fn, iters=iters, seed=seed,
                              activations=activations, estimator=estimator,
                              progress=progress)
        traces.key = key
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(traces.to_dict(), indent=1))
            tmp.replace(cache)
    calib_x = _as_xy(batches[0])[0] if activations else None
    sens = sensitivities(model, traces, calib_x, sorted(set(w_cands)), sorted(set(a_cands)),
                         layers, per_channel)
    bits = hawq_allocate(sens, infos, budget, searchable, fixed_bits, w_cands, a_cands, tol,
                         tie_bits=not activations)
    images = (0 if cached else traces.images) + int(_as_xy(batches[0])[0].shape[0])
    hvps = 0 if cached else traces.hvps
    return HawqResult(bits, traces, sens, cached, time.time() - t0, images, hvps)


# ----------------------------------------------------------------------------------------------
# the search-loop method
# ----------------------------------------------------------------------------------------------
@dataclass
class HawqConfig(TeacherOptions):
    """Options of ``mpqkit search --method hawq``.

    ``hawq_estimator`` picks the trace estimator (``ggn`` by default, see the module docstring).
    ``hawq_joint`` is the option of mpqkit <= 0.2, kept so that its configs load: ``true``
    means ``hawq_estimator: joint`` and ``false`` (its old default) ``per_block``, the estimator
    such a config ran with; leave it unset in new configs.
    """

    hawq_batches: int = field(default=4, metadata={
        "help": "proxy batches the Hessian traces are averaged over"})
    hawq_iters: int = field(default=16, metadata={
        "help": "Hutchinson samples per batch"})
    hawq_batch_size: int | None = field(default=32, metadata={
        "help": "batch size of the trace batches (default 32; null in a config file: the "
                "data batch size)"})
    hawq_activations: bool = field(default=True, metadata={
        "help": "measure activation traces too (off: a layer's activation bits = its weight "
                "bits)"})
    hawq_estimator: str = field(default="ggn", metadata={
        "help": "trace estimator: ggn (one backward per sample for all layers; exact for "
                "ReLU networks), joint (one Hessian-vector product per sample for all layers), "
                "per_block (one product per layer and sample)"})
    hawq_joint: bool | None = field(default=None, metadata={
        "help": "deprecated: true means --hawq-estimator joint, false per_block"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hawq_batches", "hawq_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hawq_batch_size is not None and self.hawq_batch_size < 1:
            raise ConfigError(f"hawq_batch_size={self.hawq_batch_size} must be at least 1")
        if self.hawq_joint is not None:
            legacy = "joint" if self.hawq_joint else "per_block"
            if self.hawq_estimator not in ("ggn", legacy):
                raise ConfigError(f"hawq_joint={self.hawq_joint} contradicts hawq_estimator="
                                  f"{self.hawq_estimator}: give only hawq_estimator")
            self.hawq_estimator, self.hawq_joint = legacy, None
        check_choice("hawq_estimator", self.hawq_estimator, ESTIMATORS)


def _fp_model(ctx: SearchContext) -> tuple[nn.Module, dict[str, Any]]:
    """The FP model HAWQ measures: the context's (weights loaded), a teacher, or trained here."""
    if ctx.weights_init != "random":
        return ctx.model, {"hawq_fp_model": ctx.weights_init}
    opts = ctx.options
    model, rec = proxy_fp_model(ctx, opts.teacher, opts.teacher_epochs, "fp", "hawq")
    record = {("hawq_fp_model" if k == "source" else f"hawq_fp_{k}"): v for k, v in rec.items()}
    return model, record


@register_method("hawq", config=HawqConfig, description="HAWQ-V3 style: Hessian trace x "
                 "quantization perturbation, integer linear program under the budget (no "
                 "supernet)")
def hawq_method(ctx: SearchContext) -> MethodResult:
    """HAWQ: Hessian-trace sensitivities and an integer linear program (no supernet)."""
    cfg, opts = ctx.cfg, ctx.options
    model, record = _fp_model(ctx)
    batches = ctx.batches(opts.hawq_batches, opts.hawq_batch_size)
    res = hawq_search(model, batches, ctx.budget, ctx.infos, ctx.searchable, ctx.fixed_bits,
                      ctx.w_candidates, ctx.a_candidates, iters=opts.hawq_iters, seed=cfg.seed,
                      tol=cfg.tol, per_channel=cfg.quant.per_channel,
                      activations=opts.hawq_activations, estimator=opts.hawq_estimator,
                      run_dir=ctx.run_dir, cache_extra=record["hawq_fp_model"],
                      progress=cfg.progress)
    (ctx.run_dir / "hawq_sensitivity.json").write_text(json.dumps(
        {"traces": res.traces.to_dict(), "omega": res.sensitivity.to_dict()}, indent=1) + "\n")
    return MethodResult(res.bits, {**record, **res.provenance()})
