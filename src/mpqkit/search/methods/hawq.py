"""HAWQ: Hessian-aware bit allocation by an integer linear program (HAWQ-V2/V3 style).

No supernet and no training search. On the full-precision model:

1. Per quantizable layer ``l``, the trace of the Hessian of the loss with respect to the layer's
   weight, ``tr(H_W[l])``, and with respect to the layer's input activation, ``tr(H_X[l])``, are
   estimated with Hutchinson's method: ``tr(H) = E[v^T H v]`` for Rademacher ``v``, with
   Hessian-vector products by double backward over that block alone (``joint=True``: one
   double backward for all blocks, cheaper but noisier). The model is in eval mode (BatchNorm
   running statistics); estimates are averaged over a few proxy batches and iterations.
2. Sensitivity of each bit choice, the second-order estimate of the loss increase (factor 1/2
   dropped, it does not change the argmin):

       Omega_w(l, b) = tr(H_W[l]) / numel(W[l]) * ||Q_b(W[l]) - W[l]||^2
       Omega_a(l, b) = tr(H_X[l]) / d[l] * mean_i ||Q_b(x_i[l]) - x_i[l]||^2

   where ``Q_b`` is the MSE-optimal uniform ``b``-bit quantizer of :mod:`mpqkit.quant` (weights
   signed symmetric, per tensor or per channel as configured; activations per tensor, unsigned
   when non-negative), ``d[l]`` the activation size of one image and ``x_i[l]`` the layer's input
   for image ``i`` of a calibration batch (the first proxy batch). Both terms estimate the
   change of the batch-mean loss, so weights and activations are on one scale.
3. An integer linear program picks one ``(w_bits, a_bits)`` per searchable layer minimising
   ``sum_l Omega_w(l, w) + Omega_a(l, a)`` under the budget, with the band
   ``[(1 - tol) * budget, budget]`` as constraint (``scipy.optimize.milp``).

With ``activations=False`` no activation trace is measured and the stated simpler rule applies:
the activation bits of a layer equal its weight bits (only choices with ``a == w``).

The traces are cached as ``hawq_traces.json`` in the run folder and reused when the model,
data, batches, iterations and seed are the same; ``hawq_sensitivity.json`` keeps the traces
and every Omega for inspection.

As ``mpqkit search --method hawq`` (registered here): the FP model is the one given by
``--weights`` (or ``bundled``); without weights, the ``teacher`` checkpoint if given, else the
model trained on the proxy set for ``teacher_epochs`` epochs into ``RUN_DIR/fp`` (a Hessian of
random weights says nothing). ``hawq_batches`` proxy batches (``options.hawq_batch_size``) and
``hawq_iters`` iterations per batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from mpqkit.errors import BudgetError, ConfigError
from mpqkit.quant.layers import QuantMixin, quantizable_layers
from mpqkit.quant.quantizers import make_act_quantizer, make_weight_quantizer
from mpqkit.search.budget import DEFAULT_TOL, check_feasible, solve_choices
from mpqkit.search.context import MethodResult, SearchContext
from mpqkit.search.methods._teacher import TeacherOptions, proxy_fp_model
from mpqkit.search.registry import register_method

CACHE_FILE = "hawq_traces.json"
log = logging.getLogger("mpqkit")
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
    hvps: int = 0  # Hessian-vector products computed
    seconds: float = 0.0
    key: str = ""
    joint: bool = True  # estimator: one product for all blocks per sample, or one per block

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
                  pert: InputPerturbation, loss_fn: LossFn, iters: int, seed: int, joint: bool,
                  on_sample: Callable[[], None] | None) -> tuple[list[float], dict[str, float],
                                                                 dict[str, int]]:
    """One batch's weight traces (in ``weights`` order) and activation traces and sizes."""
    pert.reset()

    def closure() -> tuple[Tensor, list[Tensor]]:
        loss = loss_fn(model(x), y)
        return loss, [*weights, *pert.deltas.values()]

    tr = hutchinson_trace(closure, iters, seed, joint, on_sample)
    ran = list(pert.deltas)  # layers whose input was seen (a layer may not run)
    act = {n: tr[len(weights) + i] for i, n in enumerate(ran)}
    return tr[: len(weights)], act, {n: int(pert.deltas[n][0].numel()) for n in ran}


def layer_traces(model: nn.Module, batches: Iterable[Any], layers: Sequence[str] | None = None,
                 *, loss_fn: LossFn = F.cross_entropy, iters: int = 16, seed: int = 0,
                 activations: bool = True, joint: bool = True,
                 device: torch.device | str | None = None, progress: bool = False) -> LayerTraces:
    """Per-layer Hutchinson traces of the loss Hessian, averaged over ``batches``.

    ``layers``: names of quantizable layers (default: all). The model must be full precision
    (quantizers are not twice differentiable); it runs in eval mode, its mode and parameters'
    ``requires_grad`` are restored. Batch ``k`` uses the seed ``seed + k``: the result is a
    function of the model, the batches and the seed. ``joint``: the estimator (see
    :func:`hutchinson_trace`). ``progress``: a bar on stderr when it is a terminal; one log
    line per batch either way.
    """
    mods, names = _fp_layers(model, layers)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    batches = list(batches)
    weights = [mods[n].weight for n in names]
    was_training, req = model.training, [p.requires_grad for p in weights]
    w_sum, a_sum = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    a_numel: dict[str, int] = {}
    images = hvps = 0
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
                                              seed + k, joint, bar.update)
                for n, t in zip(names, tw, strict=True):
                    w_sum[n] += t
                for n, t in ta.items():
                    a_sum[n] += t
                a_numel.update(numel)
                hvps += iters * (1 if joint else len(names) + len(ta))
                images += int(x.shape[0])
                log.info(f"hawq: trace batch {k + 1}/{len(batches)}: {int(x.shape[0])} images, "
                         f"{iters} samples, {hvps} Hessian-vector products, "
                         f"{time.time() - t0:.1f}s")
    finally:
        bar.close()
        for p, r in zip(weights, req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    if not batches:
        raise ConfigError("HAWQ got no batches: give at least one proxy batch")
    nb = len(batches)
    return LayerTraces(
        weight={n: w_sum[n] / nb for n in names}, act={n: a_sum[n] / nb for n in names},
        weight_numel={n: int(mods[n].weight.numel()) for n in names},
        act_numel={n: a_numel.get(n, 0) for n in names}, batches=nb, iters=iters, seed=seed,
        images=images, hvps=hvps, seconds=round(time.time() - t0, 3), joint=joint)


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
                "images_processed": self.images, "hessian_vector_products": self.hvps,
                # forward/backward-equivalent passes: per batch a forward and a backward with
                # graph, two per Hessian-vector product; plus the calibration forward
                "passes": (0 if self.cached else
                           2 * self.traces.batches + 2 * self.traces.hvps) + 1,
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
                activations: bool = True, joint: bool = True,
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
    key = _cache_key(model, layers, batches, iters, seed, f"{activations}:{joint}:{cache_extra}")
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
                              activations=activations, joint=joint, progress=progress)
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
    hawq_batches: int = field(default=4, metadata={
        "help": "proxy batches the Hessian traces are averaged over"})
    hawq_iters: int = field(default=16, metadata={
        "help": "Hutchinson samples per batch"})
    hawq_batch_size: int | None = field(default=None, metadata={
        "help": "batch size of the trace batches (default: the data batch size)"})
    hawq_activations: bool = field(default=True, metadata={
        "help": "measure activation traces too (off: a layer's activation bits = its weight "
                "bits)"})
    hawq_joint: bool = field(default=True, metadata={
        "help": "the joint estimator: one Hessian-vector product for all layers per sample "
                "(default since it is unbiased and layers-times cheaper; false: one product "
                "per layer and block, the exact block, much slower)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hawq_batches", "hawq_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")


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
                      activations=opts.hawq_activations, joint=opts.hawq_joint,
                      run_dir=ctx.run_dir, cache_extra=record["hawq_fp_model"],
                      progress=cfg.progress)
    (ctx.run_dir / "hawq_sensitivity.json").write_text(json.dumps(
        {"traces": res.traces.to_dict(), "omega": res.sensitivity.to_dict()}, indent=1) + "\n")
    return MethodResult(res.bits, {**record, **res.provenance()})
